"""``pixel_shuffle``: InternVL's projector. The ViT's patch grid is folded ``r x r`` into the
channels (space-to-depth, downsample ratio ``1 / r``: tokens / r^2, width x r^2), then
LayerNorm -> linear_1 -> act -> linear_2.

The fold is transformers' ``InternVLModel.pixel_shuffle`` (and llama.cpp's internvl graph):
output token ``(a, c)`` of the ``n/r x n/r`` grid, row-major, holds input patches
``(r*a + t, r*c + s)`` for ``t, s`` in ``0..r-1``, channels ordered ``(t, s, channel)``.

Settings (``ConnectorSpec.settings``): ``scale_factor`` r (an int, 1 / downsample_ratio) and
``grid`` n (patches per side of the square ViT grid).
"""

from __future__ import annotations

from ...core.errors import ConfigError
from .base import ConnectorKind, GGUFProjector, GGUFTensor, register_connector


def _fold(spec) -> tuple[int, int]:
    r, n = int(spec.settings.get("scale_factor", 0)), int(spec.settings.get("grid", 0))
    if r < 1 or n < 1 or n % r:
        raise ConfigError(f"pixel_shuffle needs settings scale_factor r >= 1 and grid n (a multiple of r); got "
                          f"{dict(spec.settings)}")
    return r, n


@register_connector
class PixelShuffle(ConnectorKind):
    name = "pixel_shuffle"
    # tools/mtmd/models/internvl.cpp: pre-norm ViT (ls1/ls2 layer scale), CLS appended after the
    # patches, every block run (the last layer's output), CLS dropped, pixel shuffle by
    # clip.vision.projector.scale_factor, then LayerNorm (eps 1e-5, fixed) -> mm.1 -> GELU -> mm.3
    gguf = GGUFProjector("internvl", "pre", cls_last=True, reads_last_layer_only=True, activations=("gelu",))

    @staticmethod
    def patch_tokens(spec, vision_tokens: int) -> int:
        r, n = _fold(spec)
        if vision_tokens != n * n:
            raise ConfigError(f"pixel_shuffle folds a square {n}x{n} patch grid; the vision encoder gives "
                              f"{vision_tokens} tokens (a kept CLS token cannot be folded)")
        return (n // r) ** 2

    @staticmethod
    def input_tokens(spec) -> int:
        return _fold(spec)[1] ** 2

    @staticmethod
    def onnx(ops, spec, features: str, vision_width: int, hidden_size: int) -> str:
        r, n = _fold(spec)
        C, m = vision_width, n // r
        # transformers' steps: [B, n, n/r, rC] -> swap the grid axes -> [B, m, m, r*r*C] -> swap back -> flatten
        x = ops.transpose(ops.reshape(features, [0, n, m, r * C]), [0, 2, 1, 3])
        x = ops.transpose(ops.reshape(x, [0, m, m, r * r * C]), [0, 2, 1, 3])
        x = ops.reshape(x, [0, m * m, r * r * C])
        x = ops.layer_norm(x, "norm", r * r * C, spec.layer_norm_eps)
        x = ops.activation(ops.linear(x, "linear_1", (hidden_size, r * r * C)), spec.activation)
        return ops.linear(x, "linear_2", (hidden_size, hidden_size))

    @staticmethod
    def gguf_tensors(spec) -> list[GGUFTensor]:
        # llama.cpp's internvl projector: mm.model.mlp.{0: LayerNorm, 1: linear_1, 3: linear_2}
        out = []
        for bid, role in ((0, "norm"), (1, "linear_1"), (3, "linear_2")):
            out.append(GGUFTensor("V_MMPROJ_MLP", role, bid))
            out.append(GGUFTensor("V_MMPROJ_MLP", role + "_bias", bid, suffix=".bias"))
        return out

    @staticmethod
    def gguf_metadata(spec) -> dict[str, int]:
        r, _ = _fold(spec)
        # one tile per image: the runtime resizes images to the model's size itself, so llama.cpp's
        # dynamic tiling (llava-uhd, up to 12 tiles plus a thumbnail by default) must not split them
        return {"clip.vision.projector.scale_factor": r, "clip.vision.preproc_min_tiles": 1,
                "clip.vision.preproc_max_tiles": 1}

    @classmethod
    def check_gguf(cls, specs):
        proj = super().check_gguf(specs)
        c = specs.connector
        if abs(c.layer_norm_eps - 1e-5) > 1e-12:
            raise ConfigError(f"llama.cpp's internvl projector runs its LayerNorm with eps 1e-5; this model's is "
                              f"{c.layer_norm_eps}")
        missing = [r for r in ("norm_bias", "linear_1_bias", "linear_2_bias") if r not in c.weights]
        if missing:
            raise ConfigError(f"llama.cpp's internvl projector needs the projector biases; this model lacks {missing}")
        return proj
