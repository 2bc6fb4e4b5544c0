"""The ``vlmexport`` command line: a thin typer layer over the library.

Only this module imports typer and rich. Every command catches
:class:`vlmexport.core.errors.VlmexportError` and prints its one-line message.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import threading
from enum import Enum
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from .core.atomic import Terminated, clear_stop, request_stop, stop_requested
from .core.errors import VlmexportError
from .core.names import Backend, CpuPrefill, Device, Spin

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="Train CogVLM-style vision-language models and export them for edge devices.")
console = Console(stderr=True)
out = Console()


def _examples(*lines: str) -> str:
    return "[bold]Examples[/bold]\n\n" + "\n\n".join(f"  $ {line}" for line in lines)


def _raise_terminated(signum, frame):  # noqa: ARG001
    request_stop()  # if the raise below is dropped (it was, inside an import lock's callback), nothing publishes
    raise Terminated()


def friendly_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        previous = None
        if threading.current_thread() is threading.main_thread():
            clear_stop()
            previous = signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            result = fn(*args, **kwargs)
            if stop_requested():  # a SIGTERM whose exception Python dropped, after the work was done
                console.print("[yellow]terminated[/yellow] after the command finished; its output is complete")
                raise typer.Exit(143)
            return result
        except VlmexportError as exc:  # one line, even when a path or value holds control characters
            msg = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(exc))
            console.print(Text.assemble(("error: ", "bold red"), msg), soft_wrap=True, highlight=False)
            raise typer.Exit(2) from None
        except OSError as exc:  # a read-only or full output directory, a file that vanished: one line
            where = f"{exc.filename}: " if exc.filename else ""
            console.print(Text.assemble(("error: ", "bold red"), f"{where}{exc.strerror or exc}; check the path, its "
                                        "permissions and the free disk space"), soft_wrap=True, highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/yellow]; rerun the same command to resume")
            raise typer.Exit(130) from None
        except Terminated:
            console.print("[yellow]terminated[/yellow]; partial output removed, earlier output kept")
            raise typer.Exit(143) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
                clear_stop()  # later library use in this process (tests, an embedding program) publishes again

    return wrapper


def _writable(path: Optional[Path], option: str) -> None:
    """Fail before a long run when its output file cannot be written (read-only or missing directory)."""
    if path is None:
        return
    import tempfile

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as exc:
        raise VlmexportError(f"{option} {path}: cannot write into {path.parent} ({exc.strerror or exc}); choose a "
                             "writable path") from None


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                    transient=False)


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)], force=True)


class QuantTarget(str, Enum):
    cpu = "cpu"
    gpu = "gpu"


class Int4Block(str, Enum):
    b32 = "32"
    b64 = "64"
    b128 = "128"


class StageChoice(str, Enum):
    scratch = "scratch"
    align = "align"
    fuse = "fuse"


class TrainPrecision(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp32 = "fp32"


class ShardChoice(str, Enum):
    ddp = "ddp"
    fsdp = "fsdp"


class OptimizerChoice(str, Enum):
    adamw = "adamw"
    adamw8bit = "adamw8bit"


# ----------------------------------------------------------------------- train
@app.command(epilog=_examples(
    "vlmexport train --recipe demo --out runs/demo",
    "vlmexport train runs/demo/model --stage fuse --data data/train.jsonl --steps 500 --out runs/fuse",
    "torchrun --nproc_per_node 2 --no-python vlmexport train --recipe demo --out runs/demo-ddp",
    "torchrun --nproc_per_node 8 --no-python vlmexport train MODEL --shard fsdp --device cuda --out runs/fsdp",
    "vlmexport train --recipe demo --out runs/demo --estimate --nproc 2",
))
@friendly_errors
def train(
    model: Optional[Path] = typer.Argument(None, help="Model directory to fine-tune (omit with --recipe)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory (resumes if it holds a checkpoint)."),
    recipe: Optional[str] = typer.Option(None, help="Built-in recipe name (demo) or a recipe .json file."),
    stage: StageChoice = typer.Option(StageChoice.fuse, help="Stage for fine-tuning MODEL: align (stage 1) or fuse "
                                      "(stage 2)."),
    data: str = typer.Option("synthetic", help="'synthetic' or a LLaVA-style .jsonl file."),
    steps: Optional[int] = typer.Option(None, min=1, help="Optimizer steps (default: the recipe's / 1000)."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Sequences per optimizer step, all ranks together."),
    grad_accum: Optional[int] = typer.Option(None, min=1, help="Micro-batches per optimizer step."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
    train_language: bool = typer.Option(False, help="Also train the language expert / decoder."),
    train_vision: bool = typer.Option(False, help="Also train the vision encoder."),
    grad_checkpointing: bool = typer.Option(False, help="Recompute activations in backward to save memory."),
    device: Device = typer.Option(Device.CPU, help="Training device."),
    max_minutes: Optional[float] = typer.Option(None, help="Stop (and save) after this many minutes."),
    precision: Optional[TrainPrecision] = typer.Option(None, help="auto: bf16 autocast on CUDA and AMX CPUs."),
    shard: Optional[ShardChoice] = typer.Option(None, help="Under torchrun: ddp replicas, or fsdp (FSDP2) sharding "
                                                "of weights, gradients and optimizer state."),
    optimizer: Optional[OptimizerChoice] = typer.Option(None, help="adamw (fused where torch has it) or adamw8bit "
                                                        "(bitsandbytes, 8-bit states)."),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile each transformer block."),
    estimate: bool = typer.Option(False, help="Print the memory estimate of each stage and exit (no training)."),
    nproc: Optional[int] = typer.Option(None, help="Processes for --estimate's DDP/FSDP rows (default: "
                                        "$WORLD_SIZE or 2)."),
    show_recipe: bool = typer.Option(False, help="Print the recipe as JSON and exit."),
    verbose: bool = typer.Option(True, help="Log progress details."),
):
    """Train a model: a recipe from scratch, or one stage (align / fuse) on an existing model."""
    _setup_logging(verbose)
    from .training import api

    options = dict(precision=precision and precision.value, shard=shard and shard.value,
                   optimizer=optimizer and optimizer.value, compile=compile_ or None)
    nproc = nproc or int(os.environ.get("WORLD_SIZE", "2"))
    if recipe is not None:
        r = api.resolve_recipe(recipe, steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                               grad_checkpointing=grad_checkpointing, max_minutes=max_minutes, **options)
        if show_recipe:
            out.print_json(r.to_json())
            return
        if estimate:
            _print_estimates(api.estimate_recipe(r, nproc, device=device.value))
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
    stage_args = dict(stage=stage.value, data=data, steps=steps or 1000, batch_size=batch_size or 16,
                      grad_accum=grad_accum or 1, lr=lr or 1e-4, train_language=train_language,
                      train_vision=train_vision, grad_checkpointing=grad_checkpointing, device=device.value,
                      max_minutes=max_minutes, **options)
    if estimate:
        _print_estimates([api.train_stage(model, out, estimate_nproc=nproc, **stage_args)])
        return
    cb, finish = _train_callbacks()
    try:
        model_dir = api.train_stage(model, out, callbacks=cb, **stage_args)
    finally:
        finish()
    console.print(f"[green]model written to[/green] {model_dir}")


def _print_estimates(stages) -> None:
    for est in stages:
        console.print(f"[bold]stage {est.stage}[/bold]: micro-batch {est.micro_batch} (one process), "
                      f"sequence length {est.seq_len}")
        for name, mem in est.setups.items():
            console.print(f"  {name}{' (per process)' if mem.world > 1 else ''}: {mem.breakdown()}")
        t = Table(title="one process: the estimate here, and the largest model of this family (width and depth "
                        "scaled together) that fits one device")
        t.add_column("setting")
        t.add_column("estimate (GiB)", justify="right")
        devices = [k for k in est.table[0] if k not in ("setting", "estimate_gib")] if est.table else []
        for d in devices:
            t.add_column(f"fits {d}", justify="right")
        for row in est.table:
            t.add_row(row["setting"], f"{row['estimate_gib']:.2f}",
                      *[f"{row[d] / 1e9:.2f} B params" if row[d] else "none" for d in devices])
        console.print(t)


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
    "vlmexport eval demo-bundle --backend onnxruntime --precision fp16",
    "vlmexport eval MODEL --data data/test.jsonl",
    "vlmexport eval MODEL --images 2",
    "vlmexport eval --seed 20261206   # a test split the demo recipe never saw",
))
@friendly_errors
def eval_(
    model: Optional[Path] = typer.Argument(None, help="Model directory (default: the shipped demo model)."),
    split: str = typer.Option("test", help="Synthetic split: test or val."),
    n_per_category: int = typer.Option(200, help="Questions per category (even; MME pairs count as two)."),
    data: Optional[Path] = typer.Option(None, help="Evaluate on a LLaVA-style .jsonl instead of synthetic data."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the full report (with predictions) here."),
    backend: Backend = typer.Option(Backend.AUTO, help="Backend for a bundle (a model dir runs on torch)."),
    precision: Optional[str] = typer.Option(None, help="Bundle precision to run (default: the backend's best)."),
    device: Device = typer.Option(Device.CPU, help="Device."),
    images: int = typer.Option(1, help="2: ask each question after an in-context example about another image."),
    seed: int = typer.Option(0, help="Synthetic generator seed (0: the one recipes train on; another: a held-out "
                                     "test split)."),
):
    """Exact match per category and MME-style acc / acc+ / score, on a model directory or a bundle."""
    _setup_logging(False)
    _writable(json_out, "--json")
    from .evaluation.api import prepare_eval
    from .evaluation.runner import evaluate

    pipe, items, meta = prepare_eval(model, split=split, n_per_category=n_per_category, data=data,
                                     device=device.value, backend=backend.value, precision=precision, images=images,
                                     seed=seed)
    progress = _progress()
    task = progress.add_task("evaluating", total=len(items), info="")
    with progress:
        report = evaluate(pipe, items, meta=meta, progress=lambda i, n: progress.update(task, completed=i))
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


CPU_PREFILL_HELP = ("onnxruntime int4/int8 on a CPU: run the prompt through an int8-GEMM copy of the decoder (auto: "
                    "on x86 CPUs without VNNI, for bundles whose gate scored it; int8: always; off: never).")


# ------------------------------------------------------------------------- run
@app.command(epilog=_examples(
    'vlmexport run demo-bundle --image scene.png --prompt "What colour is the star?"',
    'vlmexport run demo-bundle --backend torch --image a.png --image b.png --prompt "<image><image>Which is larger?" --stream',
    'vlmexport run --image scene.png --prompt "How many circles are there?"',
))
@friendly_errors
def run(
    model: Optional[Path] = typer.Argument(None, help="Bundle or model directory (default: the shipped demo model)."),
    image: list[Path] = typer.Option([], "--image", "-i", help="Image file; repeat for several images."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The question; '<image>' marks where each image goes."),
    stream: bool = typer.Option(False, help="Print tokens as they are generated."),
    max_new_tokens: int = typer.Option(64, min=0, help="Upper bound on generated tokens."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_k: int = typer.Option(0, min=0, help="Sample from the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass (1 = off)."),
    seed: Optional[int] = typer.Option(None, min=0, help="Sampling seed."),
    backend: Backend = typer.Option(Backend.AUTO, help="Backend for a bundle."),
    precision: Optional[str] = typer.Option(None, help="Bundle precision to run (default: the backend's best)."),
    device: Device = typer.Option(Device.CPU, help="Device."),
    cpu_prefill: CpuPrefill = typer.Option(CpuPrefill.AUTO, help=CPU_PREFILL_HELP),
):
    """Answer a prompt about one or more images."""
    _setup_logging(False)
    from .core.generation import GenerationConfig
    from .evaluation.api import open_pipeline
    from .runtimes.arguments import check_text

    gen = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    GenerationConfig(**gen)  # bad sampling values and prompts fail before the model is loaded
    check_text(prompt)
    pipe = open_pipeline(model, device=device.value, backend=backend.value, precision=precision,
                         cpu_prefill=cpu_prefill.value)
    if stream:
        for piece in pipe.stream(prompt, list(image), **gen):
            out.print(piece, end="", highlight=False, markup=False)
            out.file.flush()
        out.print()
    else:
        out.print(pipe.generate(prompt, list(image), **gen), highlight=False, markup=False)


# ----------------------------------------------------------------------- build
def _csv(value: str, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise VlmexportError(f"--{what} is empty; give a comma-separated list")
    return items


@app.command(epilog=_examples(
    "vlmexport build --out demo-bundle",
    "vlmexport build runs/demo/model --out bundle --format onnx,gguf --precision fp32,fp16",
    "vlmexport build big-model/ --out big-bundle --precision fp16 --no-validate --no-reference",
    "vlmexport build runs/demo/model --out bundle --format gguf --precision f16,q8_0,q4_k_m",
    "vlmexport build runs/demo/model --out bundle --format onnx --precision fp32,int8,int4 --recipe recipe.json",
    "vlmexport build runs/demo/model --out bundle --precision fp32,int8 --calib my_images/ --calib-images 256",
    "vlmexport build runs/demo/model --out bundle --precision fp32,int4 --int4-block-size 128",
))
@friendly_errors
def build(
    model: Optional[Path] = typer.Argument(None, help="Model directory (default: the shipped demo model)."),
    out: Path = typer.Option(..., "--out", "-o", help="Bundle directory to write (replaced atomically)."),
    format: str = typer.Option("onnx", "--format", help="Comma-separated formats: onnx, gguf, tensorrt (the plain-op profile TensorRT builds engines from)."),
    precision: str = typer.Option("fp32,fp16", help="Comma-separated precisions: fp32, fp16 (onnx and gguf), "
                                  "int8, int4 (onnx, calibrated and gated), bf16, q8_0, q4_k_m, q4_0 (gguf); "
                                  "f32/f16 are accepted for gguf too."),
    reference: bool = typer.Option(True, help="Include the PyTorch weights (for the torch backend)."),
    validate: bool = typer.Option(True, help="Check every artifact against PyTorch (skip only for models too big "
                                  "to hold in memory)."),
    e2e_prompts: int = typer.Option(50, min=0, help="Test-split prompts whose greedy answers must match PyTorch."),
    imatrix_pairs: int = typer.Option(64, min=0, help="Image+prompt pairs (synthetic val split) for the importance "
                                      "matrix of quantized GGUFs; 0 quantizes without one."),
    recipe: Optional[Path] = typer.Option(None, help="JSON quantization recipe for int8/int4 ONNX parts: ordered "
                                          "(pattern, precision or null) rules per part, first match wins."),
    calib: Optional[Path] = typer.Option(None, help="Calibration data for int8/int4: a LLaVA-style .jsonl or a "
                                         "directory of images (prompt from NAME.txt beside each image). Default: "
                                         "the model's synthetic validation split (never the test split)."),
    calib_images: int = typer.Option(512, min=1, help="Calibration images for int8 vision parts (unreadable ones are "
                                     "skipped and counted)."),
    calib_pairs: int = typer.Option(64, min=1, help="Image+prompt calibration pairs for the int4/int8 text decoder."),
    int4_algorithm: str = typer.Option("gptq", help="Weight-only algorithm for int4: gptq (calibrated on the "
                                       "calibration pairs, each expert on its own modality), rtn or hqq."),
    quant_target: QuantTarget = typer.Option(QuantTarget.cpu, help="Device the int4/int8 files are tuned for: "
                                             "cpu or gpu (block 128 for both); both use int8 compute "
                                             "(accuracy_level 4) on a CPU; cpu writes the int8 vision "
                                             "parts' weights on 7 bits (exact on x86 CPUs without VNNI) "
                                             "and their activations as uint8 + 128 (the same codes, "
                                             "which onnxruntime's x86 integer kernels fuse)."),
    int4_block_size: Optional[Int4Block] = typer.Option(None, help="Weights per scale in the decoder's "
                                                        "weight-only MatMulNBits (int4 layers, 8-bit LM head, int8 "
                                                        "decoder; default: the target's). On a 2-vCPU EPYC, block "
                                                        "128 decoded bench-s int4 1.3x faster than 32 "
                                                        "(docs/quantization.md)."),
    gate_items: int = typer.Option(200, min=0, help="Test-split questions per category that score int8/int4 parts "
                                   "against fp32 (accuracy gates)."),
    allow_degraded: bool = typer.Option(False, "--allow-degraded", help="Keep int8/int4 parts that fail their "
                                        "accuracy gate (recorded in the manifest) instead of failing the build."),
    cpu_prefill_gate: bool = typer.Option(True, "--cpu-prefill-gate/--no-cpu-prefill-gate", help="Also score the "
                                          "int8-GEMM prompt copy the runtime uses on x86 CPUs without VNNI (a second "
                                          "pass over the gate prompts; without it, or with --quant-target gpu, those "
                                          "CPUs run the prompt through the int4/int8 graph)."),
    allow_deviations: bool = typer.Option(False, "--allow-deviations", help="Build a format that cannot run the "
                                          "model as it is (GGUF of hf_cogvlm semantics or of a llava projector): "
                                          "what it runs is measured against PyTorch and recorded in the manifest "
                                          "and model card. Without it such a build is refused before any work."),
    verbose: bool = typer.Option(False, help="Log details."),
):
    """Export a model into a bundle: split ONNX parts, validated against PyTorch."""
    _setup_logging(verbose)
    from .pipeline.build import build as run_build
    from .pipeline.quantize import QuantOptions
    from .quant.calib import CalibrationSettings
    from .quant.recipe import QuantRecipe

    quant = QuantOptions(calibration=CalibrationSettings(images=calib_images, pairs=calib_pairs,
                                                         data=str(calib) if calib is not None else None),
                         recipe=QuantRecipe.load(recipe) if recipe is not None else None, algorithm=int4_algorithm,
                         allow_degraded=allow_degraded, eval_per_category=gate_items,
                         **{**QuantOptions.for_target(quant_target.value,
                                                      int(int4_block_size.value) if int4_block_size else None),
                            **({} if cpu_prefill_gate else {"cpu_prefill_gate": False})})
    progress = Progress(TextColumn("[bold]{task.description}"), TimeElapsedColumn(), console=console)
    with progress:
        task = progress.add_task("starting", total=None)
        result = run_build(model, out, formats=_csv(format, "format"), precisions=_csv(precision, "precision"),
                           reference=reference, validate=validate, e2e_prompts=e2e_prompts,
                           imatrix_pairs=imatrix_pairs, quant=quant, allow_deviations=allow_deviations,
                           progress=lambda step: progress.update(task, description=step))
        progress.update(task, description="done")
    _print_validation(result.validation)
    _print_gates(result.calibration)
    console.print(f"[green]bundle written to[/green] {result.out} in {result.seconds:.1f} s")


def _print_validation(v: dict) -> None:
    if not v or v.get("skipped"):
        console.print("[yellow]validation skipped[/yellow]")
        return
    t = Table(title="validation against PyTorch")
    for col in ("part", "precision", "check", "max |diff|", "tolerance", "ok"):
        t.add_column(col, justify="left" if col in ("part", "check") else "right")
    for r in v.get("parts", []):
        if r.get("max_abs_diff") is None:
            continue
        ok = ("[yellow]measured[/yellow]" if "passed" not in r else "[green]yes[/green]" if r["passed"] else
              "[red]no[/red]")  # measured: a recorded deviation, not a check
        t.add_row(r["part"], r["precision"], r["check"], f"{r['max_abs_diff']:.2e}", f"{r['tolerance']:.2e}", ok)
    out.print(t)
    e = Table(title="end to end: greedy answers against PyTorch (same; ties: differ where the reference's top "
                    "two logits are within tolerance; diverged)")
    for col in ("backend", "prompts", "same", "ties", "diverged", "agree", "needed"):
        e.add_column(col, justify="right", no_wrap=col == "backend")
    for r in v.get("end_to_end", []):
        e.add_row(r.get("backend", r.get("format", "")), str(r["prompts"]), str(r["identical"]),
                  str(r.get("near_ties", 0)), str(r.get("diverged", r["prompts"] - r["identical"])),
                  f"{r['rate']:.1%}", f"{r['threshold']:.0%}" if r.get("required", True) else "-")
    out.print(e)
    for f in v.get("failed", []):
        out.print(f"[red]{f['format']} {f['precision']} failed validation[/red]: {f['error']}")


def _print_gates(calibration: dict) -> None:
    """The int8/int4 ONNX scores against fp32 (the accuracy gates), one row per precision."""
    scores = (calibration.get("onnx") or {}).get("scores") or {}
    if not scores:
        return
    first = next(iter(scores.values()))
    ref = [f"{first['prompts']} test prompts"]
    if "accuracy_fp32" in first:
        ref.append(f"fp32 {first['accuracy_fp32']:.2f}%")
    if "mme_score_fp32" in first:
        ref.append(f"MME {first['mme_score_fp32']:.1f}")
    t = Table(title=f"int8/int4 ONNX against fp32 ({', '.join(ref)})")
    for col in ("precision", "top-1", "cosine", "exact match", "drop", "MME", "gate"):
        t.add_column(col, justify="right")
    rows = [(p, s) for precision, x in scores.items()  # each precision, then its int8-GEMM cpu prefill
            for p, s in ((precision, x), (f"{precision}, cpu prefill", x.get("cpu_prefill_int8"))) if s]
    for precision, s in rows:
        if "error" in s:  # the cpu prefill could not be scored (the build logged why)
            t.add_row(precision, "-", "-", "-", "-", "-", "[yellow]not scored, not used[/yellow]")
            continue
        gates = "; ".join(f"{'<=' if g['gate'].startswith('max') else '>='} {g['limit']}" for g in s.get("gates", []))
        verdict = "[green]passed[/green]" if s.get("passed", True) else "[red]DEGRADED[/red]"
        if precision.endswith("cpu prefill") and not s.get("passed", True):
            verdict = "[yellow]not used[/yellow]"  # vlmexport.load keeps the bundle's prefill graph
        t.add_row(precision, f"{s['top1_agreement']:.2%}", f"{s['mean_cosine']:.5f}",
                  f"{s['accuracy']:.2f}%" if "accuracy" in s else "-",
                  f"{s['accuracy_drop_points']:+.2f}" if "accuracy" in s else "-",
                  f"{s['mme_score']:.1f}" if "mme_score" in s else "-", f"{verdict} {gates}".strip())
    out.print(t)


@app.command(epilog=_examples("vlmexport inspect demo-bundle", "vlmexport inspect demo-bundle --verify size"))
@friendly_errors
def inspect(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    verify: str = typer.Option("full", help="full (sha256 of every file), size or none."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Show what a bundle holds: model, artifacts with their inputs/outputs, validation."""
    from .bundle import format_inspection, inspect_bundle

    summary = inspect_bundle(bundle, verify=verify)
    if json_out:
        out.print_json(json.dumps(summary, default=str))
    else:
        out.print(format_inspection(summary), highlight=False, markup=False)
    if summary["problems"]:  # printed above; the exit status says it too
        raise VlmexportError(summary["problems"][0])


# --------------------------------------------------------------- tensorrt: engines + doctor
class TrtTarget(str, Enum):
    jetson_orin = "jetson-orin"
    desktop = "desktop"


@app.command(epilog=_examples("vlmexport engines demo-bundle", "vlmexport engines demo-bundle --precision fp32 "
                              "--max-prompt 512", "vlmexport engines demo-bundle --cache-dir /var/cache/vlmexport "
                              "--force"))
@friendly_errors
def engines(
    bundle: Path = typer.Argument(..., help="Bundle directory with a TensorRT profile (`build --format tensorrt`)."),
    precision: str = typer.Option("fp16", help="Which TensorRT-profile precision to build engines for."),
    max_prompt: Optional[int] = typer.Option(None, help="Longest prompt (positions) of the prefill profile; "
                                             "default: the model's context length."),
    max_images: int = typer.Option(4, help="Most images per vision-encoder call (engine profile)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Engine cache (default: BUNDLE/engines, or "
                                             "$VLMEXPORT_ENGINE_CACHE)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even when a cached engine matches."),
):
    """Build (or find in the cache) the TensorRT engines of a bundle on this GPU."""
    from .bundle import Bundle
    from .runtimes.tensorrt_engines import build_bundle_engines, describe

    b = Bundle.open(bundle, verify="size")
    with Progress(TextColumn("[bold]{task.description}"), TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("engines", total=None)
        built = build_bundle_engines(b, precision, cache_dir=cache_dir, max_prompt=max_prompt, max_images=max_images,
                                     force=force, progress=lambda s: progress.update(task, description=s))
    t = Table(title="TensorRT engines")
    for col in ("engine", "profiles", "key", "status", "plan"):
        t.add_column(col)
    for r in describe(built):
        t.add_row(r["engine"], ", ".join(r["profiles"]), r["key"], "built" if r["built"] else "cached", r["plan"])
    out.print(t)


def _cpu_report() -> dict:
    """The CPU facts the runtimes' defaults follow: its name and SIMD extensions (as bench titles
    it), the physical cores and CPU quota (the default thread count), whether quantized prompts
    take the int8-GEMM prefill copy (runtimes/cpu_prefill.py)."""
    from .pipeline.bench import machine_info, machine_title
    from .runtimes.cpu_prefill import lacks_int8_dot
    from .runtimes.environment import cgroup_cpu_quota, physical_cores

    return {"name": machine_title(machine_info()), "physical_cores": physical_cores(), "cpu_quota": cgroup_cpu_quota(),
            "int8_prefill_copy": lacks_int8_dot()}


@app.command(epilog=_examples("vlmexport doctor", "vlmexport doctor demo-bundle --target jetson-orin",
                              "vlmexport doctor demo-bundle --target desktop --json"))
@friendly_errors
def doctor(
    bundle: Optional[Path] = typer.Argument(None, help="Bundle to audit for TensorRT (omit: report this machine)."),
    target: Optional[List[TrtTarget]] = typer.Option(None, help="TensorRT target(s) to audit against (default: "
                                                     "both)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """What would not parse in TensorRT (with a bundle), or what this machine can run (without)."""
    if bundle is None:
        from .runtimes.environment import probe

        env = probe()
        cpu = _cpu_report()
        if json_out:
            out.print_json(json.dumps({**env.to_dict(), "cpu": cpu}))
            return
        quota = f", quota {cpu['cpu_quota']}" if cpu["cpu_quota"] else ""
        prefill = "; no VNNI: int8-GEMM prefill copy for quantized prompts" if cpu["int8_prefill_copy"] else ""
        out.print(f"CPU           {cpu['name'] or 'unknown'}  threads: {cpu['physical_cores']} (physical "
                  f"cores{quota}){prefill}", highlight=False, soft_wrap=True)
        out.print(f"TensorRT      {env.tensorrt or 'not installed'}")
        out.print(f"CUDA          {env.cuda or 'none'}  {', '.join(env.gpus) or 'no GPU visible'}")
        out.print(f"onnxruntime   {env.onnxruntime or 'not installed'}  providers: {', '.join(env.ort_providers)}")
        gpu = {True: "GPU offload", False: "no GPU offload", None: "offload unknown"}[env.llamacpp_gpu_offload]
        out.print(f"llama.cpp     {env.llamacpp or 'not installed'}" + (f"  ({gpu})" if env.llamacpp else ""))
        t = Table(title="backends on this machine")
        t.add_column("backend")
        t.add_column("can use")
        for k, v in env.backends().items():
            t.add_row(k, v)
        out.print(t)
        return
    from .exporter.tensorrt_audit import audit_bundle, format_audit

    results, fmt = audit_bundle(bundle, [t.value for t in (target or list(TrtTarget))])
    if json_out:
        out.print_json(json.dumps({"format": fmt, "graphs": [dict(path=r.path, **r.to_dict()) for r in results]}))
    else:
        if fmt != "tensorrt":
            console.print("[yellow]this bundle has no TensorRT profile; auditing its ONNX graphs (rebuild with "
                          "`--format tensorrt` for graphs TensorRT parses)[/yellow]")
        out.print(format_audit(results, bundle), highlight=False, markup=False, soft_wrap=True)
    bad = sum(len(r.findings) for r in results)
    if bad:
        console.print(f"[red]{bad} node(s) would not parse[/red]")
        raise typer.Exit(1)
    console.print("[green]every node parses on every audited target[/green]")


# ----------------------------------------------------------------------- bench
class SyntheticChoice(str, Enum):
    bench_s = "bench-s"
    bench_l = "bench-l"


@app.command(epilog=_examples(
    "vlmexport bench demo-bundle",
    "vlmexport bench q-bundle --backend onnxruntime,llamacpp-raw --precision int4,q4_0 --interleave   # vs llama.cpp",
    "vlmexport bench b32-bundle b128-bundle --backend onnxruntime --precision fp32,int4   # two builds side by side",
    "vlmexport bench --synthetic bench-s --workdir runs/bench-s",
    "vlmexport bench --synthetic bench-l --workdir /data/bench-l   # writes a >26 GB checkpoint, then build it",
))
@friendly_errors
def bench(
    bundles: Optional[List[Path]] = typer.Argument(None, help="Bundle(s) to benchmark, side by side in one process "
                                                   "(or use --synthetic)."),
    synthetic: Optional[SyntheticChoice] = typer.Option(None, help="Benchmark a random-weight model of realistic "
                                                        "shape instead (bench-l only writes its checkpoint)."),
    workdir: Path = typer.Option(Path("runs/bench"), help="Where --synthetic writes its checkpoint and bundle."),
    backend: str = typer.Option("torch,onnxruntime,llamacpp,llamacpp-raw",
                                help="Comma-separated backends, timed side by side (those the bundle and this "
                                "installation have). llamacpp-raw: llama.cpp itself on the text GGUF with a text "
                                "prompt of the same length, the anchor row."),
    precision: Optional[str] = typer.Option(None, help="Comma-separated precisions (default: all in the bundle)."),
    prompt_tokens: int = typer.Option(32, min=1, help="Text tokens after the image in the timed prompt."),
    decode_tokens: int = typer.Option(32, min=1, help="Decode steps timed per repeat."),
    repeats: int = typer.Option(3, min=1, help="Repeats; medians are reported."),
    threads: Optional[int] = typer.Option(None, min=1, help="Threads for every backend (default: physical cores)."),
    spin: Spin = typer.Option(Spin.DECODE, help="When onnxruntime's threads busy-wait between operators: inside "
                              "decoder runs (decode, the default), every part's runs (all) or never (off). Faster when "
                              "the model has the machine to itself, slower when it does not."),
    cpu_prefill: CpuPrefill = typer.Option(CpuPrefill.AUTO, help=CPU_PREFILL_HELP),
    interleave: bool = typer.Option(False, "--interleave", help="Load every row first, then time them round by "
                                    "round, so a change of load on a shared machine hits all rows alike (holds "
                                    "every row's model in memory at once)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON (default: bench.json "
                                            "in the bundle, or in the current directory for several bundles)."),
    png: Optional[Path] = typer.Option(None, help="Write a chart (default: bench.png next to the JSON)."),
    accuracy: int = typer.Option(0, min=0, help="Also score each backend x precision on this many synthetic test items "
                                 "per category (exact match; for models trained on the synthetic task)."),
):
    """Image-encode latency, time to first token, decode tokens/s, peak memory per backend x precision."""
    _setup_logging(False)
    from .pipeline.bench import (
        COLUMNS,
        bundle_label,
        plot_report,
        ratio_line,
        report_markdown,
        report_title,
        row_cells,
        run_bench,
        write_synthetic_checkpoint,
    )

    _writable(json_out, "--json")
    _writable(png, "--png")
    if accuracy < 0 or accuracy % 2:
        raise VlmexportError(f"--accuracy {accuracy}: give an even number of items per category (existence "
                             "questions come in yes/no pairs), e.g. --accuracy 40")

    progress = Progress(TextColumn("[bold]{task.description}"), TimeElapsedColumn(), console=console)
    with progress:
        task = progress.add_task("starting", total=None)
        step = lambda d: progress.update(task, description=escape(d))  # noqa: E731
        if synthetic is not None:
            ckpt = workdir / synthetic.value / "model"
            if not (ckpt / "config.json").is_file():
                write_synthetic_checkpoint(synthetic.value, ckpt, progress=step)
            if synthetic is SyntheticChoice.bench_l:
                progress.stop()
                console.print(f"checkpoint written to {ckpt}; now run `vlmexport build {ckpt} --out BUNDLE "
                              "--precision fp16 --no-validate --no-reference` (and measure its peak RSS)")
                return
            bundle = workdir / synthetic.value / "bundle"
            bundles = [bundle]
            if not (bundle / "manifest.json").is_file():
                import importlib.util

                from .pipeline.build import build as run_build

                # GGUF too where llama.cpp is installed, so the llamacpp backend is timed beside the others
                formats = ("onnx", "gguf") if importlib.util.find_spec("llama_cpp") else ("onnx",)
                run_build(ckpt, bundle, formats=formats, precisions=_csv(precision or "fp32,fp16", "precision"),
                          e2e_prompts=4, progress=step)
        if not bundles:
            raise VlmexportError("pass a bundle directory or --synthetic bench-s")
        report = run_bench(bundles, backends=_csv(backend, "backend"),
                           precisions=_csv(precision, "precision") if precision else None,
                           prompt_tokens=prompt_tokens, decode_tokens=decode_tokens, repeats=repeats,
                           threads=threads, accuracy_per_category=accuracy, spin=spin, interleave=interleave,
                           cpu_prefill=cpu_prefill,
                           progress=step)
    # the report first: a long run's results must survive a failure to print them
    json_out = json_out or (Path(bundles[0]) / "bench.json" if len(bundles) == 1 else Path("bench.json"))
    json_out.write_text(report.to_json() + "\n")
    png = png or json_out.with_suffix(".png")
    plot_report(report, png)
    if not out.is_terminal:  # piped or logged: every cell whole, a Markdown table (rich would squeeze it to 80 columns)
        sys.stdout.write(report_markdown(report) + "\n")
        sys.stdout.flush()
    else:
        multi = len(report.bundles) > 1
        t = Table(title=escape(report_title(report)))
        for col in ("bundle",) * multi + COLUMNS:
            t.add_column(col, justify="left" if col in ("bundle", "backend", "precision") else "right")
        for r in report.rows:
            t.add_row(*(escape(c) for c in (bundle_label(r.bundle, report.bundles),) * multi + row_cells(r)))
        out.print(t)
        for name, ratio in report.ratios.items():
            out.print(escape(ratio_line(name, ratio)), soft_wrap=True)
    console.print(escape(f"report written to {json_out} and {png}"))


# ----------------------------------------------------------------------- serve
@app.command(epilog=_examples(
    "vlmexport serve demo-bundle --port 8000",
    "vlmexport serve demo-bundle --backend llamacpp --precision q8_0 --max-concurrency 2 --max-queue 32",
    "vlmexport serve /bundle --host 0.0.0.0 --device cuda --allowed-image-dir /images --request-timeout 60",
    "vlmexport serve demo-bundle --backend onnxruntime --batch 8   # decode steps of 8 requests in one run",
))
@friendly_errors
def serve(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    backend: Backend = typer.Option(Backend.AUTO, help="Backend."),
    precision: Optional[str] = typer.Option(None, help="Bundle precision to run (default: the backend's best)."),
    device: Device = typer.Option(Device.CPU, help="Device."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 inside a container)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    max_concurrency: int = typer.Option(1, help="Generations at once; each holds its own copy of the model."),
    max_queue: int = typer.Option(16, help="Requests that may wait for a slot; more are answered 429."),
    request_timeout: float = typer.Option(120.0, help="Seconds a request may take, queueing included."),
    allowed_image_dir: Optional[Path] = typer.Option(None, help="Accept local image paths / file:// URLs under "
                                                     "this directory (default: data: URLs only)."),
    allow_remote_images: bool = typer.Option(False, help="Fetch http(s) image URLs (off by default)."),
    max_image_bytes: int = typer.Option(20 << 20, help="Largest encoded image accepted (bytes); larger is 413."),
    default_max_tokens: int = typer.Option(256, help="max_tokens when a request gives none."),
    model_name: Optional[str] = typer.Option(None, help="Model id in /v1/models (default: the bundle's name)."),
    threads: Optional[int] = typer.Option(None, help="Threads per model copy (default: cores / max-concurrency)."),
    batch: int = typer.Option(0, help="Run up to this many requests' decode steps together in one model copy "
                              "(onnxruntime; replaces --max-concurrency; 0 = off)."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
):
    """Serve a bundle with OpenAI's chat-completions API (images as image_url parts, SSE streaming, /metrics)."""
    _setup_logging(False)
    from .serve import ServeConfig, serve as run_server

    cfg = ServeConfig(bundle=bundle, backend=backend.value, precision=precision, device=device.value, host=host,
                      port=port, max_concurrency=max_concurrency, max_queue=max_queue,
                      request_timeout_s=request_timeout, allowed_image_dir=allowed_image_dir,
                      allow_remote_images=allow_remote_images, max_image_bytes=max_image_bytes,
                      default_max_tokens=default_max_tokens, model_name=model_name, threads=threads, batch=batch)
    console.print(f"loading {escape(str(bundle))} ({max_concurrency} cop{'y' if max_concurrency == 1 else 'ies'})")
    run_server(cfg, log_level=log_level)


# ------------------------------------------------------------------------ plan
@app.command(epilog=_examples(
    "vlmexport plan demo-bundle --device orin-nano-8gb",
    "vlmexport plan demo-bundle --device host --context 256 --json",
    "vlmexport plan big-bundle --device agx-orin-32gb --context 4096",
))
@friendly_errors
def plan(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    device: str = typer.Option(..., help="orin-nano-8gb, orin-nx-16gb, agx-orin-32gb, agx-orin-64gb, thor, "
                               "rtx-4090, l4, h100, or host (this machine, measured)."),
    context: Optional[int] = typer.Option(None, help="Context length to plan for (default: the model's)."),
    images: Optional[int] = typer.Option(None, help="Images per prompt (default: as many as the context holds, "
                                         "up to 8)."),
    bandwidth: Optional[float] = typer.Option(None, help="Memory bandwidth in GB/s instead of the table's / "
                                              "a measurement."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
):
    """Whether a bundle fits a device: memory per artifact set, best precision, largest context, decode tok/s."""
    from .plan import plan as make_plan

    p = make_plan(bundle, device, context=context, images=images, bandwidth_gbs=bandwidth)
    if json_out:
        out.print_json(p.to_json())
        return
    d = p.device
    cc = f", compute capability {d.compute_capability}" if d.compute_capability else ""
    out.print(escape(f"{d.label}: {d.memory_gb:g} GB ({d.os_margin_gb:g} GB kept for the OS), "
                     f"{d.bandwidth_gbs:g} GB/s{cc}; backends {', '.join(d.backends)}"), highlight=False)
    t = Table(title=escape(f"{p.bundle} at context {p.context} (model {p.model_context}), {p.images} image(s)"))
    for col in ("backend", "precision", "weights GB", "KV GB", "activations GB", "overhead GB", "peak GB", "fits",
                "max context", "decode tok/s"):
        t.add_column(col, justify="left" if col in ("backend", "precision") else "right")
    for e in p.estimates:
        t.add_row(e.backend, e.precision, f"{e.weights_gb:.3f}", f"{e.kv_cache_gb:.3f}", f"{e.activations_gb:.3f}",
                  f"{e.overhead_gb:.3f}", f"{e.peak_gb:.3f}", "[green]yes[/green]" if e.fits else "[red]no[/red]",
                  str(e.max_context), f"{e.decode_tok_s:,.0f}")
    out.print(t)
    for backend in sorted({e.backend for e in p.estimates}):
        best = p.best(backend)
        out.print(f"{backend}: " + (f"best precision that fits: {best.precision}" if best else "nothing fits"))


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
