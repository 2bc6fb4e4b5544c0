"""The ``vision`` stage's data: synthetic images with dense per-patch labels.

The objective that reads them (``DensePatchObjective``: a linear head per label set over
the encoder's patch features) lives in ``objectives``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..core.preprocess import PreprocessConfig
from .batching import pixels_from_uint8
from ..data import SyntheticVQA
from ..data.labels import stacked_patch_labels


@dataclass
class PatchBatch:
    pixel_values: torch.Tensor  # [N, 3, H, W]
    labels: dict[str, torch.Tensor]  # name -> [N, P]

    def to(self, device) -> "PatchBatch":
        return PatchBatch(self.pixel_values.to(device), {k: v.to(device) for k, v in self.labels.items()})


class SyntheticPatchData:
    """Train-split synthetic images with their per-patch labels."""

    def __init__(self, gen: SyntheticVQA, preprocess: PreprocessConfig, patch_size: int, index_offset: int = 0,
                 coordinates: bool = False, centres: bool = False):
        if gen.image_size % patch_size:
            raise ValueError("the image size must be a multiple of the patch size")
        self.gen, self.preprocess = gen, preprocess
        self.grid = gen.image_size // patch_size
        self.index_offset = index_offset
        self.coordinates = coordinates  # also each patch's row and column (data.labels.label_sets)
        self.centres = centres  # ... and which object's centre it holds

    def batch(self, first: int, n: int) -> PatchBatch:
        idx = [self.index_offset + i for i in range(first, first + n)]
        images = np.stack([self.gen.sample("train", i).image for i in idx])
        labels = stacked_patch_labels([self.gen.spec("train", i) for i in idx], self.grid, self.coordinates,
                                      self.centres)
        return PatchBatch(pixels_from_uint8(images, self.preprocess), labels)
