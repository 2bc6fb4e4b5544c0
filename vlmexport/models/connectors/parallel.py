"""``parallel``: one projector per vision encoder of a :class:`~vlmexport.models.vision_specs.ParallelVisionSpec`.

``image_features`` holds the encoders' outputs one after another along the tokens
(zero-padded on the feature axis to the widest); each group slices its rows and its
own width back out and runs its own connector kind (``mlp``, ``glu``, ...) on them;
the projected groups are concatenated along the tokens in group order.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...core.errors import ConfigError
from ..spec import ConnectorSpec
from .base import ConnectorKind, get_connector, register_connector


@dataclass(frozen=True)
class ConnectorGroup:
    """One encoder's projector: rows ``[offset, offset + tokens)`` and columns ``[0, width)``."""

    spec: ConnectorSpec
    offset: int
    tokens: int
    width: int


@dataclass(frozen=True)
class ParallelConnectorSpec(ConnectorSpec):
    groups: tuple[ConnectorGroup, ...] = ()


@register_connector
class Parallel(ConnectorKind):
    name = "parallel"
    # tools/mtmd/clip-impl.h (llama.cpp in llama-cpp-python 0.3.36): every projector type reads one
    # vision tower; the one with a SAM and a CLIP encoder (deepseekocr, models/deepseekocr.cpp) runs
    # them in series (the SAM output is the CLIP ViT's input) and concatenates their channels.
    gguf_refusal = ("llama.cpp has no projector for vision encoders side by side with one projector each "
                    "(its only SAM+CLIP projector, deepseekocr, feeds SAM into CLIP and joins channels)")

    @staticmethod
    def _groups(spec) -> tuple[ConnectorGroup, ...]:
        groups = getattr(spec, "groups", ())
        if not groups:
            raise ConfigError("connector kind 'parallel' needs a ParallelConnectorSpec with one group per encoder")
        for grp in groups:
            if grp.spec.boi is not None or grp.spec.eoi is not None:
                raise ConfigError("a 'parallel' connector group cannot have its own boi/eoi; "
                                  "put them on the parallel spec")
        return groups

    @staticmethod
    def input_tokens(spec) -> int:
        return sum(g.tokens for g in Parallel._groups(spec))  # fixed rows per encoder

    @staticmethod
    def patch_tokens(spec, vision_tokens: int) -> int:
        groups = Parallel._groups(spec)
        if sum(g.tokens for g in groups) != vision_tokens:
            raise ConfigError(f"the parallel connector's groups cover {sum(g.tokens for g in groups)} tokens but the "
                              f"vision encoders give {vision_tokens}")
        return sum(get_connector(g.spec.kind).output_tokens(g.spec, g.tokens) for g in groups)

    @staticmethod
    def onnx(ops, spec, features: str, vision_width: int, hidden_size: int) -> str:
        outs = []
        for grp in Parallel._groups(spec):
            if grp.width > vision_width:
                raise ConfigError(f"a parallel connector group reads {grp.width} features of {vision_width}")
            x = ops.slice(features, [grp.offset, 0], [grp.offset + grp.tokens, grp.width], [1, 2])
            kind = get_connector(grp.spec.kind)
            outs.append(kind.onnx(ops.for_spec(grp.spec), grp.spec, x, grp.width, hidden_size))
        return ops.concat(outs, axis=1)

    @staticmethod
    def gguf_tensors(spec):  # pragma: no cover - refused before (gguf is None)
        raise ConfigError(f"GGUF export: {Parallel.gguf_refusal}")
