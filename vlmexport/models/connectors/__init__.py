"""Connector kinds: one file each, registered by decorator.

A connector kind (``ConnectorSpec.kind``) knows everything specific to it, so the
exporters stay generic:

- ``output_tokens(spec, vision_tokens)``: how many embeddings one image becomes
  (boi/eoi included); the image-token count of a model comes from here alone;
- ``onnx(ops, spec, features, vision_width, hidden_size)``: its ONNX graph, written
  through the small :class:`ConnectorOps` interface the ONNX exporter hands in (this
  package imports neither onnx nor the exporter);
- ``gguf``: llama.cpp's projector for it (a :class:`GGUFProjector`, tensor names as
  gguf-py ``MODEL_TENSOR`` member names), or ``None`` with ``gguf_refusal`` saying why
  llama.cpp cannot run it.

Adding a kind is adding a file here that subclasses :class:`ConnectorKind` under
``@register_connector``; a subclass that misses a hook fails at import.
"""

from .base import (  # noqa: F401
    ConnectorKind,
    ConnectorOps,
    GGUFProjector,
    GGUFTensor,
    connector_kinds,
    get_connector,
    register_connector,
)
