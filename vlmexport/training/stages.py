"""Training stages: which parameters train, and how the visual experts start.

- ``vision``: the vision encoder alone, on dense per-patch labels of synthetic images
  (``vision_pretrain``); the first phase of a from-scratch recipe.
- ``scratch``: everything trains (the demo model, trained from nothing).
- ``align`` (stage 1, MiniGPT-4 / LLaVA): vision encoder and decoder frozen; the
  connector (with boi/eoi) learns to map image features into the decoder.
- ``fuse`` (stage 2, CogVLM deep fusion): the visual experts are initialised by copying
  the language weights, then experts + connector train; the language expert stays
  frozen unless ``train_language=True``. Architectures without experts train the
  connector and (with ``train_language``) the decoder.
"""

from __future__ import annotations

from enum import Enum

import torch

from ..core.errors import ConfigError
from ..models.base import VLM


class Stage(str, Enum):
    VISION = "vision"
    SCRATCH = "scratch"
    ALIGN = "align"
    FUSE = "fuse"


def trainable_roles(stage: Stage, train_language: bool = False, train_vision: bool = False) -> set[str]:
    if stage is Stage.SCRATCH:
        return {"vision", "connector", "language", "visual_expert", "embedding", "other"}
    if stage is Stage.VISION:
        return {"vision"}
    roles = {"connector"}
    if stage is Stage.FUSE:
        roles.add("visual_expert")
    if train_language:
        roles |= {"language", "embedding"}
    if train_vision:
        roles.add("vision")
    return roles


@torch.no_grad()
def init_visual_experts(model: VLM) -> int:
    """Copy every language-expert weight into its visual expert; returns tensors copied."""
    n = 0
    for lang, vis in model.iter_visual_expert_pairs():
        for (ln, lp), (vn, vp) in zip(lang.named_parameters(), vis.named_parameters()):
            if ln != vn or lp.shape != vp.shape:
                raise RuntimeError(f"expert pair mismatch: {ln}{tuple(lp.shape)} vs {vn}{tuple(vp.shape)}")
            vp.copy_(lp)
            n += 1
    return n


def apply_stage(model: VLM, stage: Stage | str, train_language: bool = False, train_vision: bool = False,
                init_experts: bool | None = None, roles: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Set ``requires_grad`` for a stage; returns the names of the trainable parameters.

    ``roles`` (``TrainConfig.train_roles``), when given, are exactly the parameter roles that
    train, in place of the stage's set: for an architecture whose ``parameter_role`` names
    finer roles (e.g. a second connector that a first stage aligns alone)."""
    stage = Stage(stage)
    if stage is Stage.FUSE and init_experts is None:
        init_experts = True
    if init_experts:
        if not model.has_experts:
            raise ConfigError(f"{model.arch_name} has no visual experts to initialise; use the align stage")
        init_visual_experts(model)
    if roles:
        known = set(model.named_parameter_groups())
        unknown = sorted(set(roles) - known)
        if unknown:
            raise ConfigError(f"train_roles {unknown} name no parameter of {model.arch_name}; its roles are "
                              f"{sorted(r for r, ps in model.named_parameter_groups().items() if ps)}")
        roles = set(roles)
    else:
        roles = trainable_roles(stage, train_language, train_vision)
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(model.parameter_role(name) in roles)
        if p.requires_grad:
            names.append(name)
    if not names:
        raise ConfigError(f"stage {stage.value} leaves nothing to train for {model.arch_name}")
    return names
