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
from ..models.base import VLM
from .batching import pixels_from_uint8
from .data import SyntheticVQA
from .data.labels import LABEL_SETS, patch_labels
from .trainer import Objective


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
        images, labels = [], {k: [] for k in LABEL_SETS}
        for i in range(first, first + n):
            idx = self.index_offset + i
            images.append(self.gen.sample("train", idx).image)
            for k, v in patch_labels(self.gen.spec("train", idx), self.grid).items():
                labels[k].append(v.reshape(-1))
        return PatchBatch(pixels_from_uint8(np.stack(images), self.preprocess),
                          {k: torch.from_numpy(np.stack(v)) for k, v in labels.items()})


class DensePatchObjective(Objective):
    def __init__(self, model: VLM):
        super().__init__(model)
        width = model.config.vision_config.hidden_size
        gen = torch.Generator().manual_seed(0)
        self.heads = nn.ModuleDict({k: nn.Linear(width, n) for k, n in LABEL_SETS.items()})
        for head in self.heads.values():
            nn.init.normal_(head.weight, std=0.02, generator=gen)
            nn.init.zeros_(head.bias)

    def forward(self, batch: PatchBatch):
        feats = self.model.vision_encoder_module()(batch.pixel_values)
        n_patches = next(iter(batch.labels.values())).shape[1]
        feats = feats[:, -n_patches:]  # an encoder that keeps CLS puts it first
        losses = [F.cross_entropy(self.heads[k](feats).flatten(0, 1).float(), y.flatten())
                  for k, y in batch.labels.items()]
        return sum(losses) / len(losses), int(n_patches * batch.pixel_values.shape[0])
