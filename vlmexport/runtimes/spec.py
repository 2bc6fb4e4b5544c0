"""What a runtime needs to know about a model, and the one place it is read from a manifest.

:class:`ModelSpec` is what the shared pipeline needs (image-token count, routing and
position semantics, pad id, context length); :class:`DecoderShape` is what a backend
sizes its KV cache and IO buffers from. Both come from the bundle manifest's ``model``
section through :func:`model_spec` and :func:`decoder_shape`, which the loader, the
build's validation and the quantizer's gates all call (the torch backend builds the
same ``ModelSpec`` from a live model). Pure python: no numpy, no onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ..core.errors import VlmexportError


@dataclass(frozen=True)
class ModelSpec:
    """What the pipeline needs to know about the model (read from a bundle or a model)."""

    image_tokens: int
    expert_routing: str
    position_ids: str
    pad_token_id: int
    max_length: int
    image_placement: str = "splice"  # or "cross_attend" (core.layout.ImagePlacement)
    image_token_id: int | None = None  # what an image's positions hold; None: pad_token_id

    @property
    def placeholder_id(self) -> int:
        return self.pad_token_id if self.image_token_id is None else self.image_token_id


@dataclass(frozen=True)
class DecoderShape:
    """What a backend needs to know about the exported text decoder (from the bundle manifest;
    the exporter's ``ExportedGraph.runtime_facts()`` gives these fields)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_length: int  # context length: the KV buffers hold this many positions

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "hidden_size", "vocab_size", "max_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DecoderShape.{name} must be positive; got {getattr(self, name)}")


def _fields(model: Mapping[str, Any], names: tuple[str, ...], what: str) -> dict[str, Any]:
    missing = [n for n in names if n not in model]
    if missing:
        raise VlmexportError(f"the model section lacks {missing} ({what}); rebuild the bundle with `vlmexport build`")
    return {n: model[n] for n in names}


def model_spec(model: Mapping[str, Any]) -> ModelSpec:
    """The pipeline's :class:`ModelSpec` from a manifest's ``model`` section."""
    optional = ("image_placement", "image_token_id")  # absent from bundles written before cross-attention
    required = tuple(n for n in ModelSpec.__dataclass_fields__ if n not in optional)
    return ModelSpec(**_fields(model, required, "the pipeline needs them"),
                     **{n: model[n] for n in optional if model.get(n) is not None})


def decoder_shape(model: Mapping[str, Any]) -> DecoderShape:
    """A backend's :class:`DecoderShape` from a manifest's ``model`` section."""
    return DecoderShape(**_fields(model, tuple(DecoderShape.__dataclass_fields__), "the decoder needs them"))
