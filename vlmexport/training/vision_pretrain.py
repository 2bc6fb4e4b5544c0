"""The ``vision`` stage: pre-train the vision encoder on dense per-patch labels.

A linear head per label set (colour, shape, character; see ``data/labels.py``) reads the
encoder's patch features, and the loss is the mean cross-entropy over patches. The head
is training-only: it is checkpointed with the run but never part of the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.preprocess import PreprocessConfig
from ..data import SyntheticVQA
from ..data.labels import LABEL_SETS, stacked_patch_labels
from ..models.base import VLM
from .batching import pixels_from_uint8
from .trainer import Objective, loss_on_batch


@dataclass
class PatchBatch:
    pixel_values: torch.Tensor  # [N, 3, H, W]
    labels: dict[str, torch.Tensor]  # name -> [N, P]

    def to(self, device) -> "PatchBatch":
        return PatchBatch(self.pixel_values.to(device), {k: v.to(device) for k, v in self.labels.items()})


class SyntheticPatchData:
    """Train-split synthetic images with their per-patch labels."""

    def __init__(self, gen: SyntheticVQA, preprocess: PreprocessConfig, patch_size: int, index_offset: int = 0):
        if gen.image_size % patch_size:
            raise ValueError("the image size must be a multiple of the patch size")
        self.gen, self.preprocess = gen, preprocess
        self.grid = gen.image_size // patch_size
        self.index_offset = index_offset

    def batch(self, first: int, n: int) -> PatchBatch:
        idx = [self.index_offset + i for i in range(first, first + n)]
        images = np.stack([self.gen.sample("train", i).image for i in idx])
        labels = stacked_patch_labels([self.gen.spec("train", i) for i in idx], self.grid)
        return PatchBatch(pixels_from_uint8(images, self.preprocess), labels)


def _heads(width: int) -> nn.ModuleDict:
    gen = torch.Generator().manual_seed(0)
    heads = nn.ModuleDict({k: nn.Linear(width, n) for k, n in LABEL_SETS.items()})
    for head in heads.values():
        nn.init.normal_(head.weight, std=0.02, generator=gen)
        nn.init.zeros_(head.bias)
    return heads


def dense_loss(heads: nn.ModuleDict, feats: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
    n_patches = next(iter(labels.values())).shape[1]
    feats = feats[:, -n_patches:]  # an encoder that keeps CLS puts it first
    losses = [F.cross_entropy(heads[k](feats).flatten(0, 1).float(), y.flatten()) for k, y in labels.items()]
    return sum(losses) / len(losses)


class DensePatchObjective(Objective):
    """The ``vision`` stage: dense per-patch classification only."""

    def __init__(self, model: VLM):
        super().__init__(model)
        self.heads = _heads(model.config.vision_config.hidden_size)

    def forward(self, batch: PatchBatch):
        feats = self.model.vision_encoder_module()(batch.pixel_values)
        n = next(iter(batch.labels.values())).numel()
        return dense_loss(self.heads, feats, batch.labels), int(n)


class NextTokenWithDenseObjective(Objective):
    """Next-token loss plus ``weight`` x the dense per-patch loss on the same images
    (keeps training the encoder's patch features while the decoder learns to read them)."""

    def __init__(self, model: VLM, weight: float):
        super().__init__(model)
        self.heads = _heads(model.config.vision_config.hidden_size)
        self.weight = weight

    def forward(self, batch):
        feats = self.model.vision_encoder_module()(batch.pixel_values)
        embeds = self.model.connector_module()(feats)
        loss, n = loss_on_batch(self.model, batch, image_embeds=embeds)
        if batch.patch_labels:
            loss = loss + self.weight * dense_loss(self.heads, feats, batch.patch_labels)
        return loss, n
