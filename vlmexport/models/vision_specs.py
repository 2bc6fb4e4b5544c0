"""Vision-encoder spec types beyond the plain ViT (:class:`~vlmexport.models.spec.VisionSpec`).

The vision part of :class:`~vlmexport.models.spec.PartSpecs` is one of these spec types;
the ONNX writer picks the graph by the spec's type (``exporter/onnx_vision.py`` for the
ViT, ``exporter/onnx_vision_kinds.py`` for the others), so no exporter names an
architecture. Every vision spec answers ``image_size``, ``output_tokens`` (rows of
``image_features`` per image) and ``output_width`` (its feature width).

- :class:`ViTDetSpec`: a SAM-style ViTDet encoder (transformers' ``GotOcr2VisionEncoder``,
  ``SamVisionEncoder``): patch conv, absolute positions on the patch grid, pre-norm blocks
  with windowed attention (zero-padded to whole windows) and decomposed relative positions,
  some blocks global, then a conv neck (1x1 conv -> LayerNorm2d -> 3x3 conv -> LayerNorm2d)
  to ``output_channels``. Output: the neck's grid flattened row-major, one token per cell.
- :class:`ParallelVisionSpec`: several encoders reading the same ``pixel_values`` side by
  side. ``image_features`` holds their outputs one after another along the token axis
  (branch 0 first); a branch narrower than the widest is zero-padded on the feature axis.
  The connector (kind ``parallel``) slices each branch back out, so the padding never
  reaches a projector. One graph, one ``image_features``: every runtime, the TensorRT
  profile and the int8 calibration handle it exactly like a single encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core.errors import ConfigError


@dataclass(frozen=True)
class ViTDetSpec:
    """A SAM-style ViTDet encoder. Names are templates with ``{i}`` for the block index;
    biases are found by name (``spec.bias_of``) where the checkpoint holds them."""

    image_size: int
    patch_size: int
    hidden_size: int
    mlp_dim: int
    num_layers: int
    num_heads: int
    window_size: int  # 0: every block global
    global_layers: tuple[int, ...]  # blocks that attend over the whole grid
    output_channels: int
    layer_norm_eps: float
    activation: str
    patch_weight: str
    patch_bias: str | None
    positions: str | None  # absolute positions [1, grid, grid, D], or None
    qkv: str  # fused [3D, D]
    o: str
    fc1: str
    fc2: str
    norm1: str
    norm2: str
    rel_pos_h: str | None  # [2 * size - 1, head_dim] (size: window, or the grid for global blocks)
    rel_pos_w: str | None
    neck_conv1: str  # [C, D, 1, 1], no bias
    neck_norm1: str  # LayerNorm2d weight; bias "weight" -> "bias"
    neck_conv2: str  # [C, C, 3, 3], padding 1, no bias
    neck_norm2: str
    neck_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"ViTDet image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"ViTDet hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if any(not 0 <= i < self.num_layers for i in self.global_layers):
            raise ConfigError(f"ViTDet global_layers {list(self.global_layers)} must index blocks 0..{self.num_layers - 1}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def window_of(self, i: int) -> int:
        """Window side of block ``i`` (0: global attention over the whole grid)."""
        return 0 if i in self.global_layers else self.window_size

    @property
    def output_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def output_width(self) -> int:
        return self.output_channels


@dataclass(frozen=True)
class ParallelVisionSpec:
    """Encoders side by side on the same pixels; their tokens concatenated in ``branches`` order."""

    branches: tuple[Any, ...]  # VisionSpec | ViTDetSpec

    def __post_init__(self) -> None:
        if len(self.branches) < 2:
            raise ConfigError("a parallel vision spec needs at least two encoders")
        sizes = {b.image_size for b in self.branches}
        if len(sizes) != 1:
            raise ConfigError(f"the parallel vision encoders read one preprocessed image, so their image sizes must "
                              f"agree; got {sorted(sizes)}: set every encoder's image_size to the same value")

    @property
    def image_size(self) -> int:
        return self.branches[0].image_size

    @property
    def token_offsets(self) -> tuple[int, ...]:
        """First ``image_features`` row of each branch."""
        out, at = [], 0
        for b in self.branches:
            out.append(at)
            at += b.output_tokens
        return tuple(out)

    @property
    def output_tokens(self) -> int:
        return sum(b.output_tokens for b in self.branches)

    @property
    def output_width(self) -> int:
        return max(b.output_width for b in self.branches)
