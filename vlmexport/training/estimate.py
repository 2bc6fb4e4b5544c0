"""``vlmexport train --estimate``: the memory estimate of each stage, without training.

For every stage of a recipe (or the one fine-tuning stage on a model directory): the
estimate per process for one process, DDP and FSDP over ``nproc`` processes, and for
fp32 / bf16 with and without gradient checkpointing the largest model of the same
shape family that fits a 24 GB GPU and an 8 GB Jetson (``memory.settings_table``).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.preprocess import PreprocessConfig
from ..models.base import VLM
from .batching import ModelLayoutInfo
from ..data import SyntheticVQA
from .memory import MemoryEstimate, estimate_memory, settings_table
from .stages import Stage, apply_stage
from .trainer import TrainConfig, sequence_length_of, autocast_dtype


@dataclass
class StageEstimate:
    stage: str
    micro_batch: int
    seq_len: int
    setups: dict[str, MemoryEstimate] = field(default_factory=dict)  # "1 process" / "DDP x2" / "FSDP x2"
    table: list[dict] = field(default_factory=list)


def estimate_stage(model: VLM, data, cfg: TrainConfig, stage: str, nproc: int, device: str = "cpu",
                   train_language: bool = False, train_vision: bool = False) -> StageEstimate:
    apply_stage(model, stage, train_language, train_vision, init_experts=False, roles=cfg.train_roles)
    mixed = autocast_dtype(cfg.precision, torch.device(device)) is not None
    est = StageEstimate(stage, cfg.batch_size // cfg.grad_accum, 0)
    for name, world, shard in (("1 process", 1, "none"), (f"DDP x{nproc}", nproc, "ddp"),
                               (f"FSDP x{nproc}", nproc, "fsdp")):
        if world == 1 and name != "1 process":
            continue
        micro = max(1, cfg.batch_size // (world * cfg.grad_accum))
        seq = sequence_length_of(data, micro)
        est.seq_len = max(est.seq_len, seq)
        est.setups[name] = estimate_memory(model, micro, seq, mixed, cfg.grad_checkpointing, world, shard,
                                           cfg.optimizer, device=device)
    est.table = settings_table(model, est.micro_batch, est.seq_len, 1, "none", cfg.optimizer)
    return est


def estimate_recipe(recipe, nproc: int = 1, device: str = "cpu") -> list[StageEstimate]:
    from .datasets import SyntheticTrainData
    from .recipes import build_model, ensure_tokenizer
    from .vision_pretrain import SyntheticPatchData

    gen = SyntheticVQA(image_size=recipe.image_size, seed=recipe.data_seed)
    model = build_model(recipe)
    pre = PreprocessConfig(image_size=recipe.image_size)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        tok = ensure_tokenizer(recipe, Path(tmp), gen)
        for spec in recipe.stages:
            if spec.stage == Stage.VISION.value:
                data = SyntheticPatchData(gen, pre, model.config.vision_config.patch_size)
            else:
                data = SyntheticTrainData(gen, tok, model.default_chat_template(), ModelLayoutInfo.of(model), pre,
                                          turns=spec.turns)
            out.append(estimate_stage(model, data, spec.train, spec.stage, nproc, device, spec.train_language,
                                      spec.train_vision))
    return out
