"""Runtimes: one pipeline over every backend (torch, onnxruntime, tensorrt, llamacpp)."""

from .pipeline import Message, ModelSpec, Pipeline  # noqa: F401
