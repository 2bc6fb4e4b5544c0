"""The ``vlmexport`` command line: a thin typer layer over the library.

Only this module imports typer and rich. Every command catches
:class:`vlmexport.core.errors.VlmexportError` and prints its one-line message.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .core.errors import VlmexportError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="Train CogVLM-style vision-language models and export them for edge devices.")
console = Console(stderr=True)
out = Console()


def _examples(*lines: str) -> str:
    return "[bold]Examples[/bold]\n\n" + "\n\n".join(f"  $ {line}" for line in lines)


def friendly_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VlmexportError as exc:
            console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, markup=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/yellow]; rerun the same command to resume")
            raise typer.Exit(130) from None

    return wrapper


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                    transient=False)


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)], force=True)


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


class StageChoice(str, Enum):
    scratch = "scratch"
    align = "align"
    fuse = "fuse"


# ----------------------------------------------------------------------- train
@app.command(epilog=_examples(
    "vlmexport train --recipe demo --out runs/demo",
    "vlmexport train runs/demo/model --stage fuse --data data/train.jsonl --steps 500 --out runs/fuse",
    "torchrun --nproc_per_node 2 --no-python vlmexport train --recipe demo --out runs/demo-ddp",
))
@friendly_errors
def train(
    model: Optional[Path] = typer.Argument(None, help="Model directory to fine-tune (omit with --recipe)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory (resumes if it holds a checkpoint)."),
    recipe: Optional[str] = typer.Option(None, help="Built-in recipe name (demo) or a recipe .json file."),
    stage: StageChoice = typer.Option(StageChoice.fuse, help="Stage for fine-tuning MODEL: align (stage 1) or fuse "
                                      "(stage 2)."),
    data: str = typer.Option("synthetic", help="'synthetic' or a LLaVA-style .jsonl file."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (default: the recipe's / 1000)."),
    batch_size: Optional[int] = typer.Option(None, help="Sequences per optimizer step, all ranks together."),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches per optimizer step."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
    train_language: bool = typer.Option(False, help="Also train the language expert / decoder."),
    train_vision: bool = typer.Option(False, help="Also train the vision encoder."),
    grad_checkpointing: bool = typer.Option(False, help="Recompute activations in backward to save memory."),
    device: Device = typer.Option(Device.cpu, help="Training device."),
    max_minutes: Optional[float] = typer.Option(None, help="Stop (and save) after this many minutes."),
    show_recipe: bool = typer.Option(False, help="Print the recipe as JSON and exit."),
    verbose: bool = typer.Option(True, help="Log progress details."),
):
    """Train a model: a recipe from scratch, or one stage (align / fuse) on an existing model."""
    _setup_logging(verbose)
    from .training import api

    if recipe is not None:
        r = api.resolve_recipe(recipe, steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                               grad_checkpointing=grad_checkpointing, max_minutes=max_minutes)
        if show_recipe:
            out.print_json(r.to_json())
            return
        cb, finish = _train_callbacks()
        try:
            model_dir = api.train_recipe(r, out, device=device.value, callbacks=cb)
        finally:
            finish()
        console.print(f"[green]model written to[/green] {model_dir}")
        return
    if model is None:
        raise VlmexportError("pass a model directory to fine-tune, or --recipe demo to train from scratch")
    cb, finish = _train_callbacks()
    try:
        model_dir = api.train_stage(model, out, stage=stage.value, data=data, steps=steps or 1000,
                                    batch_size=batch_size or 16, grad_accum=grad_accum or 1, lr=lr or 1e-4,
                                    train_language=train_language, train_vision=train_vision,
                                    grad_checkpointing=grad_checkpointing, device=device.value,
                                    max_minutes=max_minutes, callbacks=cb)
    finally:
        finish()
    console.print(f"[green]model written to[/green] {model_dir}")


def _train_callbacks():
    from .training.trainer import Callbacks

    progress = _progress()
    state = {"task": None}

    def on_start(total, start, mem):
        console.print(mem.describe())
        if state["task"] is not None:
            progress.remove_task(state["task"])
        state["task"] = progress.add_task("training", total=total, completed=start, info="")
        progress.start()

    def on_step(s):
        progress.update(state["task"], completed=s.step,
                        info=f"loss {s.loss:.4f} lr {s.lr:.1e} {s.sequences_per_s:.1f} seq/s")

    def on_eval(step, metrics):
        progress.console.print(f"step {step}: " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()))

    return Callbacks(on_start=on_start, on_step=on_step, on_eval=on_eval), progress.stop


# ------------------------------------------------------------------------ eval
@app.command("eval", epilog=_examples(
    "vlmexport eval",
    "vlmexport eval runs/demo/model --n-per-category 200 --json eval.json",
    "vlmexport eval MODEL --data data/test.jsonl",
))
@friendly_errors
def eval_(
    model: Optional[Path] = typer.Argument(None, help="Model directory (default: the shipped demo model)."),
    split: str = typer.Option("test", help="Synthetic split: test or val."),
    n_per_category: int = typer.Option(200, help="Questions per category (even; MME pairs count as two)."),
    data: Optional[Path] = typer.Option(None, help="Evaluate on a LLaVA-style .jsonl instead of synthetic data."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the full report (with predictions) here."),
    device: Device = typer.Option(Device.cpu, help="Device for the torch backend."),
):
    """Exact match per category and MME-style acc / acc+ / score."""
    _setup_logging(False)
    from .evaluation.api import evaluate_path

    progress = _progress()
    task = progress.add_task("evaluating", total=None, info="")
    with progress:
        report = evaluate_path(model, split=split, n_per_category=n_per_category, data=data, device=device.value,
                               progress=lambda i, n: progress.update(task, completed=i, total=n))
    _print_report(report)
    if json_out:
        json_out.write_text(report.to_json() + "\n")
        console.print(f"report written to {json_out}")


def _print_report(report) -> None:
    t = Table(title=f"exact match ({report.meta.get('backend', '')}, {report.meta.get('split', '')})")
    t.add_column("category")
    t.add_column("exact match", justify="right")
    t.add_column("n", justify="right")
    for cat, r in report.per_category.items():
        t.add_row(cat, f"{r['accuracy'] * 100:.1f}%", str(int(r["n"])))
    t.add_row("[bold]overall[/bold]", f"[bold]{report.overall * 100:.1f}%[/bold]", str(report.n))
    out.print(t)
    if report.mme:
        m = Table(title="MME-style yes/no")
        for col in ("category", "acc", "acc+", "score"):
            m.add_column(col, justify="left" if col == "category" else "right")
        for cat, r in report.mme.items():
            m.add_row(cat, f"{r['acc'] * 100:.1f}", f"{r['acc_plus'] * 100:.1f}", f"{r['score']:.1f}")
        m.add_row("[bold]total[/bold]", "", "", f"[bold]{report.mme_score:.1f}[/bold]")
        out.print(m)


# ------------------------------------------------------------------------- run
@app.command(epilog=_examples(
    'vlmexport run --image cat.png --prompt "What colour is the circle?"',
    'vlmexport run runs/demo/model --image a.png --image b.png --prompt "<image><image>Which is larger?" --stream',
))
@friendly_errors
def run(
    model: Optional[Path] = typer.Argument(None, help="Model directory (default: the shipped demo model)."),
    image: list[Path] = typer.Option([], "--image", "-i", help="Image file; repeat for several images."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The question; '<image>' marks where each image goes."),
    stream: bool = typer.Option(False, help="Print tokens as they are generated."),
    max_new_tokens: int = typer.Option(64, help="Upper bound on generated tokens."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_k: int = typer.Option(0, help="Sample from the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass (1 = off)."),
    seed: Optional[int] = typer.Option(None, help="Sampling seed."),
    device: Device = typer.Option(Device.cpu, help="Device for the torch backend."),
):
    """Answer a prompt about one or more images."""
    _setup_logging(False)
    from .evaluation.api import open_pipeline

    pipe = open_pipeline(model, device=device.value)
    gen = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if stream:
        for piece in pipe.stream(prompt, list(image), **gen):
            out.print(piece, end="", highlight=False, markup=False)
            out.file.flush()
        out.print()
    else:
        out.print(pipe.generate(prompt, list(image), **gen), highlight=False, markup=False)


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
