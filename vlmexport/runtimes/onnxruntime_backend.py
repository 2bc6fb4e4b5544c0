"""The ``onnxruntime`` backend: the exported ONNX parts behind the shared pipeline.

Runs ``vision_encoder.onnx`` -> ``connector.onnx`` for images, looks token embeddings
up in the exported table (numpy), and runs ``text_decoder.onnx`` for prefill and for
each decode step. The KV cache is one preallocated ``[1, kv_heads, max_length, head_dim]``
buffer per layer and per key/value, bound (IO binding) both as the graph's past input
and as its present output: ``GroupQueryAttention`` sees the same pointer and writes the
new positions into it in place, so nothing is re-concatenated or copied per token.

Only numpy, safetensors and onnxruntime are imported here (a device installs the
runtime without torch or the model code).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnxruntime as ort

from ..core.errors import BundleError
from ..core.layout import LANGUAGE, SequenceLayout
from ..core.names import CpuPrefill, Spin
from .cpu_prefill import check_fits, int8_prefill_path, wanted
from .environment import meminfo_bytes, physical_cores
from .spec import DecoderShape

log = logging.getLogger(__name__)

# the inputs of a cross-attending decoder graph (named by exporter/onnx_cross_attention.py)
CROSS_MEMORY, CROSS_MEDIA = "cross_attention_memory", "media"

_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


# onnxruntime's common-subexpression elimination merges the per-MatMul Q -> DQ pairs that
# vlmexport.quant writes into a SwiGLU connector's gate and up projections back into one
# shared QuantizeLinear, after which its x86 S8->U8 rewrite skips them and they run as
# DequantizeLinear + fp32 MatMul (bench-s connector: 17.1 ms with it, 10.2 ms without, fp32 10.0 ms).
QDQ_DISABLED_OPTIMIZERS = ("CommonSubexpressionElimination",)


# Run options of the steps whose working memory grows with the request (the vision parts with the
# number of images, a prefill with the prompt): hand the arena regions they grew back when the run
# ends. Without it each session's arena keeps its largest request's buffers for good, and the
# sessions' arenas add up: bench-s int4, 5 images + text to the 1,024-token context, four requests in
# one process, resident above the loaded weights 334 -> 513 -> 515 -> 515 MB with every arena kept,
# 208 -> 284 -> 284 -> 284 MB with this (docs/deployment.md). Decode steps keep their arena (the
# hot path, small and constant); the cost is re-faulting the freed pages on the next request.
KV_CHUNK = 128  # positions the CPU KV buffers grow by (OrtModelSession._ensure_kv)

SHRINK_ARENA = ort.RunOptions()
SHRINK_ARENA.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, CPU always."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def session_options(intra_op_num_threads: int | None = None, allow_spinning: bool = False,
                    optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                    profile: bool = False) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = intra_op_num_threads or physical_cores()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = optimization
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    if allow_spinning:  # spin only inside Run(): the idle sessions' pools must not spin while another part runs
        so.add_session_config_entry("session.force_spinning_stop", "1")
    so.enable_profiling = profile
    so.log_severity_level = 3
    return so


def read_embedding_table(path: str | os.PathLike) -> np.ndarray:
    """The ``weight`` tensor of a token-embedding safetensors file, or one BundleError line
    (the safetensors reader checks the header's offsets against the file before reading)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))["weight"]
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        detail = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise BundleError(f"{path}: not a valid token-embedding safetensors file ({detail}); rebuild the bundle "
                          "with `vlmexport build`") from None


class OrtModelSession:
    """:class:`~vlmexport.core.generation.DecoderSession` over the exported ONNX files (batch 1).

    ``vision_fallback`` encodes images (pixels -> embeddings) when the vision ONNX files
    are not given, e.g. the torch reference while those parts are being exported.
    ``decode_path`` (optional) is the routing-free one-token graph; without it the routed
    graph runs the decode steps too.

    ``cpu_prefill`` (a :class:`~vlmexport.core.names.CpuPrefill`: "off", the default here, "auto"
    or "int8"; None is "auto"): on the CPU provider, run the prompt through an int8-GEMM copy of a
    quantized decoder graph, derived once into ``cpu_prefill_cache`` (default: the user cache) and
    keyed by ``cpu_prefill_identity`` (the manifest's hashes of the decoder's files) where given;
    the decode steps keep the bundle's graphs. "auto" falls back to the bundle's graph with a
    warning if the copy cannot be made or opened. ``vlmexport.load`` passes "auto" for bundles whose
    gate scored that copy (runtimes/cpu_prefill.py has the figures).

    ``allow_spinning`` (a :class:`~vlmexport.core.names.Spin`): whether onnxruntime's pool
    threads busy-wait between operators inside a Run() instead of sleeping until the next one.
    ``"decode"`` (the
    default) spins in the decoder's sessions only, ``"all"`` in the vision parts too, ``"off"``
    nowhere. ``session.force_spinning_stop`` stops each session's pool spinning when its Run()
    returns, so idle sessions never spin while another part runs (without it the decoder's
    threads spun through the image encode: bench-s int4 on a 2-vCPU EPYC, encode 131 vs 79 ms).
    A decode step is ~80 small operators, each handing work to the pool: woken from sleep,
    the hand-over costs more than the work (bench-s int4, block 128, 2-vCPU EPYC, decode graph:
    110 vs 92 tok/s spinning vs sleeping on a quiet machine; with another process busy on one
    core, 65 vs 86, while raw llama.cpp, whose threads also spin, fell from 108 to 28 tok/s).
    """

    def __init__(self, decoder_path: str | os.PathLike, embedding_path: str | os.PathLike, facts: DecoderShape, *,
                 decode_path: str | os.PathLike | None = None,
                 vision_encoder_path: str | os.PathLike | None = None,
                 connector_path: str | os.PathLike | None = None,
                 vision_fallback: Callable[[np.ndarray], np.ndarray] | None = None,
                 providers: Sequence[str] | None = None, intra_op_num_threads: int | None = None,
                 max_length: int | None = None, allow_spinning: bool | str = "decode", profile: bool = False,
                 cpu_prefill: str = "off", cpu_prefill_cache: str | os.PathLike | None = None,
                 cpu_prefill_identity: str | None = None):
        self.facts = facts
        self.max_length = min(max_length or facts.max_length, facts.max_length)
        self.providers = list(providers or default_providers())
        self.threads = intra_op_num_threads or physical_cores()
        self.spin = Spin.of(allow_spinning)
        self._opts = lambda decoder=False: session_options(
            self.threads, self.spin is Spin.ALL or (decoder and self.spin is Spin.DECODE), profile=profile)
        # the int8-GEMM prefill graph (runtimes/cpu_prefill.py): the prompt runs through it, the decode
        # steps through the decode graph or, without one, through the bundle's own decoder graph
        self.prefill_path, self.decoder = None, None
        if self.providers[0] == "CPUExecutionProvider" and wanted(cpu_prefill):
            try:
                if CpuPrefill.of(cpu_prefill) is CpuPrefill.AUTO:  # "int8" is the caller's own call
                    check_fits(decoder_path, meminfo_bytes("MemAvailable"), decode_path)
                self.prefill_path = int8_prefill_path(decoder_path, cpu_prefill_cache, cpu_prefill_identity)
                self.decoder = self._session(self.prefill_path, decoder=True) if self.prefill_path else None
            except Exception as exc:  # asked for by name: fail; "auto": the bundle's graph does the work
                if CpuPrefill.of(cpu_prefill) is CpuPrefill.INT8:
                    raise
                log.warning("int8 prefill graph not used (%s); the prompt runs through the bundle's decoder graph",
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                self.prefill_path = None
        if self.decoder is None:
            self.decoder = self._session(decoder_path, decoder=True)
        if not decode_path and self.prefill_path:
            decode_path = decoder_path
        self.decode_graph = self._session(decode_path, decoder=True) if decode_path else None
        self.vision_encoder = self._session(vision_encoder_path, qdq=True) if vision_encoder_path else None
        self.connector = self._session(connector_path, qdq=True) if connector_path else None
        if (self.vision_encoder is None) != (self.connector is None):
            raise ValueError("give both vision_encoder_path and connector_path, or neither")
        self.vision_fallback = vision_fallback

        self.embedding = read_embedding_table(embedding_path)
        if self.embedding.shape != (facts.vocab_size, facts.hidden_size):
            raise ValueError(f"{embedding_path}: embedding table has shape {list(self.embedding.shape)}; the decoder "
                             f"expects [{facts.vocab_size}, {facts.hidden_size}]")
        types = {i.name: i.type for i in self.decoder.get_inputs()}
        self.dtype = np.dtype(_ORT_TO_NUMPY[types["inputs_embeds"]])
        self._kv_dtype = np.dtype(_ORT_TO_NUMPY[types["past_key_values.0.key"]])
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type([1, 1, facts.vocab_size], np.float32, "cpu", 0)
        self._ones = np.ones((1, self.max_length), dtype=np.int64)
        self.kv: list = []
        self._kv_arrays: list[np.ndarray] = []
        self.kv_capacity = 0
        self._bindings: dict = {}
        self.length = 0
        self._ensure_kv(1)
        self._routed = {id(s): "token_type" in {i.name for i in s.get_inputs()}
                        for s in (self.decoder, self.decode_graph) if s is not None}
        # a decoder that cross-attends to the images (its graph takes them as memory, see
        # exporter/onnx_cross_attention.py) rather than reading them in its sequence
        memory = next((i for i in self.decoder.get_inputs() if i.name == CROSS_MEMORY), None)
        self.cross_attend = memory is not None
        self._no_image = (np.zeros((1, 1, memory.shape[-1]), dtype=self.dtype) if memory is not None else None)
        self._memory = self._no_image
        self._last_media = np.full((1, 1), -1, np.int64)

    # ------------------------------------------------------------------ setup
    def _session(self, path: str | os.PathLike, qdq: bool = False, decoder: bool = False) -> ort.InferenceSession:
        """``qdq``: a vision part, whose int8 file is QDQ (see :data:`QDQ_DISABLED_OPTIMIZERS`);
        ``decoder``: a decoder graph (spins under the default spin mode)."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such ONNX file; export the model first")
        disabled = list(QDQ_DISABLED_OPTIMIZERS) if qdq and ".int8." in Path(path).name else None
        return ort.InferenceSession(str(path), self._opts(decoder), providers=self.providers,
                                    disabled_optimizers=disabled)

    def _ensure_kv(self, total: int) -> None:
        """KV buffers holding at least ``total`` positions, bound to every decoder session.

        On a CPU they grow in steps of :data:`KV_CHUNK` positions (up to ``max_length``), keeping
        what they hold: GroupQueryAttention's CPU kernel costs more the longer its buffer, whatever
        the positions in use (bench-s, 16 layers at 263 positions: 1.10 ms with a 265-slot buffer,
        1.66 ms with the context's 1,024; benchmarks/cpu_decode_breakdown.py). On CUDA they are
        allocated once at ``max_length`` (no host copies on the way)."""
        if total <= self.kv_capacity:
            return
        f = self.facts
        cap = self.max_length if self.device != "cpu" else min(self.max_length, -(-total // KV_CHUNK) * KV_CHUNK)
        shape = [1, f.num_kv_heads, cap, f.head_dim]
        if self.device == "cpu":
            arrays = [np.empty(shape, self._kv_dtype) for _ in range(2 * f.num_layers)]
            for old, new in zip(self._kv_arrays, arrays):
                new[:, :, :self.length] = old[:, :, :self.length]
            self._kv_arrays = arrays  # the OrtValues below share this memory
            self.kv = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
        else:
            self.kv = [ort.OrtValue.ortvalue_from_shape_and_type(shape, self._kv_dtype, self.device, 0)
                       for _ in range(2 * f.num_layers)]
        self.kv_capacity = cap
        self._bindings = {id(s): self._bind(s) for s in (self.decoder, self.decode_graph) if s is not None}

    def _bind(self, sess: ort.InferenceSession) -> ort.IOBinding:
        io = sess.io_binding()
        for i in range(self.facts.num_layers):
            for j, kind in enumerate(("key", "value")):
                buf = self.kv[2 * i + j]
                io.bind_ortvalue_input(f"past_key_values.{i}.{kind}", buf)
                io.bind_ortvalue_output(f"present.{i}.{kind}", buf)  # same buffer: GQA updates it in place
        io.bind_ortvalue_output("logits", self.logits)
        return io

    # -------------------------------------------------------------- protocol
    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        if self.vision_encoder is not None:
            px = pixel_values.astype(_ORT_TO_NUMPY[self.vision_encoder.get_inputs()[0].type], copy=False)
            feats = self.vision_encoder.run(["image_features"], {"pixel_values": px}, SHRINK_ARENA)[0]
            feats = feats.astype(_ORT_TO_NUMPY[self.connector.get_inputs()[0].type], copy=False)
            return self.connector.run(["image_embeds"], {"image_features": feats}, SHRINK_ARENA)[0].astype(np.float32)
        if self.vision_fallback is None:
            raise RuntimeError("this session has no vision_encoder/connector ONNX files and no vision_fallback; "
                               "export the vision parts or pass vision_fallback")
        return np.asarray(self.vision_fallback(pixel_values), dtype=np.float32)

    def prefill(self, layout: SequenceLayout, image_embeds: np.ndarray | None) -> np.ndarray:
        n = len(layout)
        if n > self.max_length:
            raise ValueError(f"the prompt has {n} positions; the context holds {self.max_length}")
        emb = np.take(self.embedding, layout.input_ids, axis=0).astype(self.dtype, copy=False)
        n_img = int(layout.is_image.sum())
        if self.cross_attend:  # the placeholders stay text; the images become the cross-attention memory
            self._memory = self._no_image if image_embeds is None else np.ascontiguousarray(
                np.asarray(image_embeds).reshape(1, -1, self._no_image.shape[-1]), dtype=self.dtype)
            media = layout.media if image_embeds is not None else np.full(n, -1, np.int64)
            self._last_media = np.asarray(media[-1:], np.int64).reshape(1, 1)
            self.length = 0
            self._run(self.decoder, emb[None], layout.position_ids[None], layout.token_type[None], n, media[None])
            self.length = n
            return self.logits.numpy()[0, -1].copy()
        if n_img or image_embeds is not None:
            flat = np.zeros((0, self.facts.hidden_size)) if image_embeds is None else np.asarray(image_embeds)
            flat = flat.reshape(-1, self.facts.hidden_size)
            if flat.shape[0] != n_img:
                raise ValueError(f"prompt has {n_img} image positions but {flat.shape[0]} image embeddings were given")
            emb[layout.is_image] = flat
        self.length = 0
        self._run(self.decoder, emb[None], layout.position_ids[None], layout.token_type[None], n)
        self.length = n
        return self.logits.numpy()[0, -1].copy()

    def decode(self, token: int, position: int) -> np.ndarray:
        if self.length >= self.max_length:
            raise ValueError(f"the context holds {self.max_length} positions and is full")
        emb = self.embedding[token].astype(self.dtype, copy=False).reshape(1, 1, -1)
        sess = self.decode_graph or self.decoder
        self._run(sess, emb, np.array([[position]], np.int64), np.full((1, 1), LANGUAGE, np.int64), self.length + 1,
                  self._last_media)  # generated tokens attend to the prompt's last image
        self.length += 1
        return self.logits.numpy()[0, -1].copy()

    def reset(self) -> None:
        self.length = 0  # the buffers keep stale values; GQA reads only the first ``length`` slots
        self._memory, self._last_media = self._no_image, np.full((1, 1), -1, np.int64)

    # -------------------------------------------------------------- running
    def _run(self, sess: ort.InferenceSession, emb: np.ndarray, position_ids: np.ndarray, token_type: np.ndarray,
             total: int, media: np.ndarray | None = None) -> None:
        self._ensure_kv(total)
        io = self._bindings[id(sess)]
        io.bind_cpu_input("inputs_embeds", np.ascontiguousarray(emb))
        io.bind_cpu_input("attention_mask", self._ones[:, :total])
        io.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        if self._routed[id(sess)]:
            io.bind_cpu_input("token_type", np.ascontiguousarray(token_type, dtype=np.int64))
        if self.cross_attend:
            io.bind_cpu_input(CROSS_MEMORY, self._memory)
            io.bind_cpu_input(CROSS_MEDIA, np.ascontiguousarray(media, dtype=np.int64))
        sess.run_with_iobinding(io, SHRINK_ARENA if emb.shape[1] > 1 else None)  # a prefill; decode keeps its arena

    def end_profiling(self) -> list[str]:
        return [s.end_profiling() for s in (self.decoder, self.decode_graph) if s is not None]
