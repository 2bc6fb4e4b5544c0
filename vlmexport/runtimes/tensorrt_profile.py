"""The TensorRT-profile graphs behind the runtime protocol: a static-KV-cache session.

The TensorRT profile of a bundle (``tensorrt/*.onnx``, see
``vlmexport.exporter.tensorrt_decoder``) keeps the KV cache in fixed buffers
``[1, kv_heads, capacity, head_dim]`` that each step updates at ``write_index``.
:class:`StaticCacheSession` implements the :class:`~vlmexport.core.generation.DecoderSession`
protocol over an *executor* that runs the parts:

- :class:`OrtProfileExecutor` (here): onnxruntime, normally on the CPU, which is how a
  build validates the profile where no GPU exists; the onnxruntime TensorRT execution
  provider can be asked for the vision parts (``vision_providers``).
- ``tensorrt_backend.TensorRTExecutor``: native TensorRT engines on a GPU.

An executor ping-pongs two sets of KV buffers: each step reads set A as ``past`` and
writes the updated buffers into set B (``present``), then the sets swap, so nothing is
allocated or copied per step beyond what ScatterND writes.

Only numpy, safetensors and onnxruntime are imported here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..core.layout import SequenceLayout

_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


@dataclass(frozen=True)
class ProfileFiles:
    """The files of a TensorRT-profile bundle a session runs."""

    text_decoder: Path  # the routed (prefill) graph
    token_embedding: Path
    vision_encoder: Path
    connector: Path
    decode: Path | None = None  # the routing-free one-token graph (expert models)


class ProfileExecutor(Protocol):
    capacity: int  # KV slots
    dtype: np.dtype  # float type of inputs_embeds

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray: ...

    def step(self, embeds: np.ndarray, position_ids: np.ndarray, token_type: np.ndarray | None,
             write_index: int) -> np.ndarray:
        """Run ``embeds`` [1, S, H] at slots ``write_index..+S``; returns the last position's logits [V]."""


class StaticCacheSession:
    """:class:`~vlmexport.core.generation.DecoderSession` over a :class:`ProfileExecutor` (batch 1)."""

    def __init__(self, executor: ProfileExecutor, embedding_path: str | os.PathLike, hidden_size: int,
                 vocab_size: int):
        from safetensors.numpy import load_file

        self.executor = executor
        self.embedding = load_file(str(embedding_path))["weight"]
        if self.embedding.shape != (vocab_size, hidden_size):
            raise ValueError(f"{embedding_path}: embedding table has shape {list(self.embedding.shape)}; the decoder "
                             f"expects [{vocab_size}, {hidden_size}]")
        self.hidden_size = hidden_size
        self.max_length = executor.capacity
        self.length = 0

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        return np.asarray(self.executor.encode_images(pixel_values), dtype=np.float32)

    def prefill(self, layout: SequenceLayout, image_embeds: np.ndarray | None) -> np.ndarray:
        n = len(layout)
        if n > self.max_length:
            raise ValueError(f"the prompt has {n} positions; the KV buffers hold {self.max_length}")
        emb = np.take(self.embedding, layout.input_ids, axis=0).astype(self.executor.dtype, copy=True)
        n_img = int(layout.is_image.sum())
        if n_img or image_embeds is not None:
            flat = np.zeros((0, self.hidden_size)) if image_embeds is None else np.asarray(image_embeds)
            flat = flat.reshape(-1, self.hidden_size)
            if flat.shape[0] != n_img:
                raise ValueError(f"prompt has {n_img} image positions but {flat.shape[0]} image embeddings were given")
            emb[layout.is_image] = flat
        self.length = 0
        logits = self.executor.step(emb[None], layout.position_ids[None].astype(np.int64),
                                    layout.token_type[None].astype(np.int64), 0)
        self.length = n
        return logits

    def decode(self, token: int, position: int) -> np.ndarray:
        if self.length >= self.max_length:
            raise ValueError(f"the KV buffers hold {self.max_length} positions and are full")
        emb = self.embedding[token].astype(self.executor.dtype, copy=False).reshape(1, 1, -1)
        logits = self.executor.step(emb, np.array([[position]], np.int64), None, self.length)
        self.length += 1
        return logits

    def reset(self) -> None:
        self.length = 0  # stale slots beyond ``length`` are masked out and overwritten


def ort_session_options(threads: int | None = None, exact_dequantize: bool = True):
    """onnxruntime options for the profile graphs. ``exact_dequantize``: keep block-quantized
    ``DequantizeLinear`` + MatMul exact (onnxruntime otherwise fuses it into an int8-compute
    MatMulNBits, max error ~0.1), as TensorRT dequantizes to the float type."""
    from .onnxruntime_backend import session_options

    so = session_options(threads)
    if exact_dequantize:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return so


class OrtProfileExecutor:
    """Runs the TensorRT-profile graphs with onnxruntime (CPU unless ``providers`` says otherwise)."""

    def __init__(self, files: ProfileFiles, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,
                 providers: Sequence[str] | None = None, vision_providers: Sequence | None = None,
                 threads: int | None = None):
        import onnxruntime as ort

        self._ort = ort
        self.providers = list(providers or ["CPUExecutionProvider"])
        opts = lambda: ort_session_options(threads)
        graphs = (files.text_decoder, files.vision_encoder, files.connector) + ((files.decode,) if files.decode else ())
        for p in graphs:
            if not Path(p).is_file():
                raise FileNotFoundError(f"{p}: no such ONNX file; build the bundle with `--format tensorrt`")
        self.prefill_graph = ort.InferenceSession(str(files.text_decoder), opts(), providers=self.providers)
        self.decode_graph = (ort.InferenceSession(str(files.decode), opts(), providers=self.providers)
                             if files.decode else self.prefill_graph)
        vp = list(vision_providers or self.providers)
        self.vision_encoder = ort.InferenceSession(str(files.vision_encoder), opts(), providers=vp)
        self.connector = ort.InferenceSession(str(files.connector), opts(), providers=vp)
        types = {i.name: i.type for i in self.prefill_graph.get_inputs()}
        self.dtype = np.dtype(_ORT_TO_NUMPY[types["inputs_embeds"]])
        self.routed = {id(s): "token_type" in {i.name for i in s.get_inputs()}
                       for s in (self.prefill_graph, self.decode_graph)}
        self.num_layers, self.capacity = num_layers, capacity
        shape = (1, num_kv_heads, capacity, head_dim)
        self.kv = [[np.zeros(shape, self.dtype) for _ in range(2 * num_layers)] for _ in range(2)]
        self.current = 0  # which set holds the cache
        vocab = self.prefill_graph.get_outputs()[0].shape[-1]
        self.logits = np.zeros((1, 1, int(vocab)), np.float32)
        self._bindings: dict[tuple[int, int], object] = {}

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        px = pixel_values.astype(_ORT_TO_NUMPY[self.vision_encoder.get_inputs()[0].type], copy=False)
        feats = self.vision_encoder.run(["image_features"], {"pixel_values": px})[0]
        feats = feats.astype(_ORT_TO_NUMPY[self.connector.get_inputs()[0].type], copy=False)
        return self.connector.run(["image_embeds"], {"image_features": feats})[0]

    def _binding(self, sess):
        """The IOBinding of ``sess`` reading the current KV set and writing the other one (and the
        logits): made once per (session, set) and reused, since the buffers never move."""
        key = (id(sess), self.current)
        if key not in self._bindings:
            io = sess.io_binding()
            src, dst = self.kv[self.current], self.kv[1 - self.current]
            for i in range(self.num_layers):
                for j, kind in enumerate(("key", "value")):
                    # an OrtValue over the numpy memory: the reused binding reads the buffer as it is now
                    io.bind_ortvalue_input(f"past_key_values.{i}.{kind}",
                                           self._ort.OrtValue.ortvalue_from_numpy(src[2 * i + j]))
                    io.bind_output(f"present.{i}.{kind}", "cpu", 0, self.dtype, list(dst[2 * i + j].shape),
                                   dst[2 * i + j].ctypes.data)
            io.bind_output("logits", "cpu", 0, np.float32, list(self.logits.shape), self.logits.ctypes.data)
            self._bindings[key] = io
        return self._bindings[key]

    def step(self, embeds, position_ids, token_type, write_index: int) -> np.ndarray:
        sess = self.decode_graph if token_type is None else self.prefill_graph
        io = self._binding(sess)
        io.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds))
        io.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids))
        if self.routed[id(sess)]:
            tt = token_type if token_type is not None else np.zeros_like(position_ids)
            io.bind_cpu_input("token_type", np.ascontiguousarray(tt))
        io.bind_cpu_input("write_index", np.array([write_index], np.int64))
        sess.run_with_iobinding(io)
        self.current = 1 - self.current
        return self.logits[0, -1].copy()
