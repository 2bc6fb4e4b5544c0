"""Library entry points behind ``vlmexport train`` (the CLI only parses options)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..core.errors import ConfigError
from ..data import SyntheticVQA
from ..models.checkpoint import load_pretrained, save_pretrained
from ..runtimes.torch_backend import chat_template_for
from .batching import ModelLayoutInfo
from .datasets import JsonlTrainData, SyntheticTrainData
from .recipes import Recipe, get_recipe, run_recipe
from .trainer import Callbacks, TrainConfig, train


def resolve_recipe(name_or_path: str, steps: int | None = None, batch_size: int | None = None,
                   grad_accum: int | None = None, lr: float | None = None, grad_checkpointing: bool = False,
                   max_minutes: float | None = None, **train_options) -> Recipe:
    """A recipe with command-line overrides applied to each of its stages (``train_options``:
    further ``TrainConfig`` fields such as precision, shard, optimizer, compile; None = keep)."""
    recipe = get_recipe(name_or_path)
    changes = {k: v for k, v in dict(steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                                     **train_options).items() if v is not None}
    if grad_checkpointing:
        changes["grad_checkpointing"] = True
    for spec in recipe.stages:
        spec.train = dataclasses.replace(spec.train, **changes)
        if max_minutes is not None:
            spec.max_minutes = max_minutes
    return recipe


def estimate_recipe(recipe: Recipe, nproc: int = 1, device: str = "cpu"):
    from .estimate import estimate_recipe as _estimate

    return _estimate(recipe, nproc, device)


def train_recipe(recipe: Recipe, out: str | Path, device: str = "cpu", callbacks: Callbacks | None = None) -> Path:
    return run_recipe(recipe, out, device=device, callbacks=callbacks)


def train_stage(model_dir: str | Path, out: str | Path, stage: str = "fuse", data: str = "synthetic",
                steps: int = 1000, batch_size: int = 16, grad_accum: int = 1, lr: float = 1e-4,
                train_language: bool = False, train_vision: bool = False, grad_checkpointing: bool = False,
                device: str = "cpu", max_minutes: float | None = None, seed: int = 0,
                callbacks: Callbacks | None = None, estimate_nproc: int | None = None, **train_options):
    """One stage (align / fuse / scratch) on an existing model directory -> ``out/model``
    (``train_options``: further ``TrainConfig`` fields). With ``estimate_nproc`` it only
    returns the stage's memory estimate (``estimate.StageEstimate``)."""
    loaded = load_pretrained(model_dir, dtype=torch.float32)
    model, tok, pre = loaded.model, loaded.tokenizer, loaded.preprocess
    template = chat_template_for(model, model_dir)
    info = ModelLayoutInfo.of(model)
    if data == "synthetic":
        source = SyntheticTrainData(SyntheticVQA(image_size=pre.image_size, seed=seed), tok, template, info, pre,
                                    seed=seed)
    elif str(data).endswith(".jsonl"):
        source = JsonlTrainData(data, tok, template, info, pre, seed=seed)
    else:
        raise ConfigError(f"--data {data!r} is neither 'synthetic' nor a .jsonl file")
    cfg = TrainConfig(steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                      warmup_steps=min(100, max(1, steps // 10)), grad_checkpointing=grad_checkpointing, seed=seed,
                      **{k: v for k, v in train_options.items() if v is not None})
    if estimate_nproc is not None:
        from .estimate import estimate_stage

        return estimate_stage(model, source, cfg, stage, estimate_nproc, device, train_language, train_vision)
    out = Path(out)
    result = train(model, source, cfg, out / f"stage-{stage}", stage=stage, train_language=train_language,
                   train_vision=train_vision, device=device, callbacks=callbacks,
                   stop_after_s=max_minutes * 60 if max_minutes else None)
    if result.reason == "interrupted":
        raise KeyboardInterrupt
    model_dir_out = out / "model"
    save_pretrained(model.to("cpu"), model_dir_out, tok, pre, metadata={"stage": stage, "steps": result.steps_done},
                    template=template)
    (out / "history.json").write_text(json.dumps(result.history, indent=2) + "\n")
    return model_dir_out
