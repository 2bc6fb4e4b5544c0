"""Runtimes: one pipeline over every backend (torch, onnxruntime, llamacpp), and ``spec``: the one
place a bundle manifest becomes what a backend needs. Imports nothing of exporter, quant,
training or pipeline: a device installs this and ``vlmexport.bundle`` alone."""

from .pipeline import Message, Pipeline  # noqa: F401
from .spec import DecoderShape, ModelSpec, decoder_shape, model_spec  # noqa: F401
