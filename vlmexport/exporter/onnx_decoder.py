"""The ``text_decoder`` part as ONNX, built directly from checkpoint tensors.

The graph is written layer by layer from a :class:`~vlmexport.models.spec.DecoderSpec`;
every weight is read with ``tensors.get(name)``, streamed into one external-data file
(``<name>.onnx.data``) and dropped before the next one is read, so peak memory is one
checkpoint tensor (one q/k/v group when a spec names them separately) plus the
weightless graph and a 16 MB transposition chunk, whatever the model size (bench-s:
exporting a 1.94 GB checkpoint peaks at +208 MB RSS; its largest tensor is 131 MB).

Graph (opset 17 + ``com.microsoft`` contrib ops, for onnxruntime)::

    inputs_embeds [batch, sequence, hidden]     position_ids / token_type [batch, sequence] int64
    attention_mask [batch, total_sequence] int64 (1 = a filled cache slot or a new position)
    past_key_values.{i}.key / .value [batch, kv_heads, past_sequence, head_dim]
      -> logits [batch, 1, vocab] float32 (the last valid position of each row only)
      -> present.{i}.key / .value [batch, kv_heads, total_sequence, head_dim]

- Expert routing by gather/scatter: the flattened positions are split once per run into
  language (``token_type != 1``) and vision (``token_type == 1``) row indices (NonZero);
  every routed block Gathers its expert's rows, runs that expert's MatMuls on them only,
  and puts the rows back in place (Concat, then a Gather by the inverse permutation,
  which ScatterND builds once per run). Routed blocks: QKV, attention output, the whole
  SwiGLU MLP. A step without image positions runs the vision MatMuls on 0 rows.
- RoPE (rotate-half) from the ``position_ids`` input with ``com.microsoft.RotaryEmbedding``
  (positions are not cache slots under ``hf_cogvlm``), then ``GroupQueryAttention`` with
  ``do_rotary=0``. GQA's own rotary (packed QKV plus its ``position_ids`` input) honours
  explicit positions on the CPU provider (checked in onnxruntime 1.31), but the CUDA
  provider's fused kernels rotate keys at ``past_length + s`` (onnxruntime's GQA.md), which
  is wrong after an image under ``hf_cogvlm``; the separate op costs ~0.3 ms of a bench-s
  decode step on CPU; ``seqlens_k`` / ``total_sequence_length`` come from ``attention_mask``
  as onnxruntime-genai derives them. Bind each past and present to one preallocated
  ``[batch, kv_heads, max_length, head_dim]`` buffer (IO binding) and GQA writes the new
  keys/values in place (it detects past == present); unbound, it concatenates.
- Norms: ``com.microsoft.SkipSimplifiedLayerNormalization`` (residual add fused) with
  float32 statistics in both precisions; the first one (no residual yet) as plain float32
  ops, which onnxruntime fuses. Every graph passes ``onnx.checker``.
- Projections are ``MatMul(x, W)`` with W stored transposed ``[in, out]`` (the
  :mod:`.onnx_common` convention, the form onnxruntime's MatMulNBits quantizer reads);
  gate and up stay separate MatMuls, one per checkpoint tensor. Measured on bench-s
  (2 cores): ``Gemm(transB=1)`` on ``[out, in]``, a fused gate|up MatMul and this layout
  decode and prefill within noise of each other (13.4-13.6 tok/s, loaded machine).
- Logits are computed for the last valid position of each row only (``attention_mask``
  row sum), so the LM head never runs over the prompt; right-padded batches work. The last
  layer keeps only those rows once its attention has written the keys and values of every
  position: its attention output, norm and MLP run on one row per sequence, not on the whole
  prompt (as llama.cpp's graphs skip unused outputs in their last layer). bench-s: ~5% of a
  prefill's MatMul work. The int64 scalar input ``last_layer_all_rows`` (an initializer, so
  optional; default 0) set to 1 runs them over every position, with the same logits:
  calibration reads every position's input to those MatMuls (quant/calib.py). The one-token
  ``.decode.onnx`` graph has nothing to drop and does without it.
- ``decode_model=True`` also writes ``<stem>.decode.onnx``: the same graph without routing
  (language expert only) over the same ``.onnx.data`` file, for one-token steps, which
  never hold image positions (``vlmexport build`` writes it; ~0.1 MB). It is the template
  of the quantized decoders' decode graphs (quant/decode_graph.py), which the onnxruntime
  backend runs for int8/int4 decode steps (bench-s int4: +6%, the visual expert's
  MatMulNBits on zero rows and the routing Gathers/Concats gone, for +142 MB of a second
  prepacked copy of the language weights). The fp32 one stays unused on CPU: there the
  routed graph's empty vision gathers cost ~1% of a decode step (bench-s: 13.9 vs 13.8
  tok/s) and the second copy is +0.95 GB. A GPU runtime may want it (no NonZero host sync;
  static shapes for CUDA graphs).

fp16: weights, KV cache and ``inputs_embeds`` in float16, logits float32. onnxruntime's
CPU execution provider has no fp16 MatMul on x86: it inserts Casts and folds the fp16
weights to float32 at session creation, so fp16 files are half the size but decode at
fp32 speed (bench-s: 12.9 vs 13.8 tok/s). fp16 is for the CUDA/TensorRT providers.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from ..core.names import DECODER_ALL_ROWS
from ..models.layers import rope_inv_freq
from ..models.spec import DecoderSpec
from . import onnx_cross_attention as xattn
from .onnx_common import IR_VERSION, OPSET, PRECISIONS, ExportedGraph, ExternalDataFile, IOSpec, TensorSource

__all__ = ["DecoderGraph", "IOSpec", "export_text_decoder", "export_token_embedding"]

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
CHUNK_BYTES = 16 << 20  # transposition chunk while streaming a weight
_ONNX_DTYPE = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
               np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int32): TensorProto.INT32}


@dataclass(frozen=True)
class DecoderGraph(ExportedGraph):
    """What :func:`export_text_decoder` wrote (an :class:`ExportedGraph` plus the decoder's facts)."""

    decode_path: Path | None = None  # routing-free one-token graph sharing ``data_path``; None if not written
    max_length: int = 0  # the KV buffer length the rotary tables cover
    num_layers: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    hidden_size: int = 0
    vocab_size: int = 0
    has_experts: bool = False

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(p for p in (self.path, self.decode_path, self.data_path) if p is not None)

    def runtime_facts(self) -> dict[str, int]:
        """The model facts a runtime needs (``runtimes.spec.DecoderShape(**facts)``; manifest-ready)."""
        return dict(num_layers=self.num_layers, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                    hidden_size=self.hidden_size, vocab_size=self.vocab_size, max_length=self.max_length)


# ------------------------------------------------------------------ tensor access
def _to_numpy(t: Any) -> np.ndarray:
    """A checkpoint tensor (torch or numpy) as a numpy array; shares memory when it can."""
    if isinstance(t, np.ndarray):
        return t
    if hasattr(t, "detach"):  # a torch.Tensor
        t = t.detach().cpu()
        return t.float().numpy() if str(t.dtype) == "torch.bfloat16" else t.numpy()  # numpy has no bfloat16
    return np.asarray(t)


def _names(names: str | tuple[str, ...], i: int) -> tuple[str, ...]:
    return tuple(n.format(i=i) for n in ((names,) if isinstance(names, str) else names))


# --------------------------------------------------------------- external data
def _external(name: str, dtype: np.dtype, shape: Sequence[int], location: str, offset: int,
              length: int) -> TensorProto:
    t = TensorProto(name=name, data_type=_ONNX_DTYPE[np.dtype(dtype)], dims=list(shape))
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        t.external_data.add(key=k, value=v)
    return t


def _rows(a: np.ndarray, dtype: np.dtype) -> Iterator[np.ndarray]:
    """``a`` converted to ``dtype``, in chunks of rows."""
    step = max(1, CHUNK_BYTES // max(1, a[0].size * dtype.itemsize)) if a.ndim > 1 else a.shape[0]
    for r in range(0, a.shape[0], step):
        yield a[r: r + step].astype(dtype, copy=False)


def _transposed(parts: Sequence[np.ndarray], dtype: np.dtype) -> Iterator[np.ndarray]:
    """``concatenate(parts, axis=0).T`` ([in, sum(out_i)]) in chunks of rows of the result."""
    n_in, n_out = parts[0].shape[1], sum(p.shape[0] for p in parts)
    step = max(1, CHUNK_BYTES // (n_out * dtype.itemsize))
    for c in range(0, n_in, step):
        yield np.concatenate([p[:, c: c + step].T.astype(dtype) for p in parts], axis=1)


# ------------------------------------------------------------------ graph builder
class _Graph:
    """A tiny ONNX graph builder: nodes, inline constants, external weights."""

    def __init__(self, data: ExternalDataFile, location: str):
        self.data, self.location = data, location  # location: the data file's final name
        self.weight_bytes = 0
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._used: dict[str, int] = {}
        self._consts: dict[tuple, str] = {}

    def _unique(self, base: str) -> str:
        n = self._used.get(base, 0)
        self._used[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    def op(self, op_type: str, inputs: Sequence[str], name: str | None = None, outputs: int | Sequence[str] = 1,
           domain: str = "", **attrs) -> Any:
        node_name = self._unique(name or op_type)
        outs = ([f"{node_name}/out{j}" if outputs > 1 else f"{node_name}/out" for j in range(outputs)]
                if isinstance(outputs, int) else list(outputs))
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=node_name, domain=domain or None,
                                           **attrs))
        return outs[0] if len(outs) == 1 else outs

    def const(self, value: Any, dtype=np.int64) -> str:
        """A small inline constant (shapes, indices, scalars); identical values are shared."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self._unique(f"const_{arr.dtype.name}_{'x'.join(map(str, arr.shape)) or 'scalar'}")
            self.initializers.append(onnx.numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def weight(self, name: str, shape: Sequence[int], dtype: np.dtype, chunks: Iterator[np.ndarray]) -> str:
        """Stream ``chunks`` (the tensor's bytes in order) into the data file as initializer ``name``."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        offset, length = self.data.append(chunks, nbytes)
        self.initializers.append(_external(name, dtype, shape, self.location, offset, length))
        self.weight_bytes += length
        return name


# --------------------------------------------------------------------- decoder
class _DecoderBuilder:
    """Writes the weights once and emits the routed graph (and optionally a routing-free one)."""

    def __init__(self, tensors: TensorSource, spec: DecoderSpec, g: _Graph, precision: str, max_length: int):
        self.t, self.spec, self.g = tensors, spec, g
        self.dtype = PRECISIONS[precision]
        self.max_length = max_length
        self.q_out = spec.num_heads * spec.head_dim
        self.kv_out = spec.num_kv_heads * spec.head_dim
        self.weights: dict[str, str] = {}  # role key -> initializer name

    # ---------------------------------------------------------------- weights
    def _get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        a = _to_numpy(self.t.get(name))
        if a.shape != shape:
            raise ValueError(f"checkpoint tensor {name} has shape {list(a.shape)}; the spec implies {list(shape)}")
        return a

    def _linear(self, key: str, names: Sequence[str], outs: Sequence[int], in_features: int) -> None:
        """One projection for ``MatMul(x, W)``: the [out_i, in] tensors ``names``, fused along out and
        written transposed as [in, sum(out_i)], chunk by chunk (a fused group is read at once)."""
        parts = [self._get(n, (o, in_features)) for n, o in zip(names, outs)]
        self.weights[key] = self.g.weight(key, (in_features, sum(outs)), self.dtype, _transposed(parts, self.dtype))
        del parts

    def _vector(self, key: str, name: str, size: int) -> None:
        a = self._get(name, (size,))
        self.weights[key] = self.g.weight(key, (size,), self.dtype, _rows(a, self.dtype))
        del a

    def write_weights(self) -> None:
        s = self.spec
        H, F, q, kv = s.hidden_size, s.intermediate_size, self.q_out, self.kv_out
        experts = [("language", s.language)] + ([("vision", s.vision)] if s.vision is not None else [])
        for i in range(s.num_layers):
            self._vector(f"layers.{i}.attn_norm.weight", s.attn_norm.format(i=i), H)
            for tag, e in experts:
                p = f"layers.{i}.{tag}"
                qkv = _names(e.qkv, i)
                self._linear(f"{p}.qkv.weight", qkv, (q + 2 * kv,) if len(qkv) == 1 else (q, kv, kv), H)
                if e.qkv_bias is not None:  # Qwen2-style attention: one fused [q + 2 kv] bias
                    bias = _names(e.qkv_bias, i)
                    parts = [self._get(n, (o,)) for n, o in zip(bias, (q + 2 * kv,) if len(bias) == 1
                                                                else (q, kv, kv))]
                    self.weights[f"{p}.qkv.bias"] = self.g.weight(
                        f"{p}.qkv.bias", (q + 2 * kv,), self.dtype, _rows(np.concatenate(parts), self.dtype))
                    del parts  # the written biases are no longer held
                self._linear(f"{p}.o.weight", _names(e.o, i), (H,), q)
            self._vector(f"layers.{i}.ffn_norm.weight", s.ffn_norm.format(i=i), H)
            for tag, e in experts:
                p = f"layers.{i}.{tag}"
                self._linear(f"{p}.gate.weight", _names(e.gate, i), (F,), H)
                self._linear(f"{p}.up.weight", _names(e.up, i), (F,), H)
                self._linear(f"{p}.down.weight", _names(e.down, i), (H,), F)
        self._vector("final_norm.weight", s.final_norm, H)
        self._linear("lm_head.weight", (s.lm_head,), (s.vocab_size,), H)
        # rotary tables [max_length, head_dim / 2], computed as the reference does (layers.rope_cos_sin)
        freqs = (torch.arange(self.max_length, dtype=torch.float32)[:, None]
                 * rope_inv_freq(s.head_dim, s.rope_theta)[None, :])
        for name, table in (("rope.cos", freqs.cos()), ("rope.sin", freqs.sin())):
            self.weights[name] = self.g.weight(name, tuple(table.shape), self.dtype, _rows(table.numpy(), self.dtype))
        if xattn.has_cross_attention(s):
            xattn.write_weights(self)

    # ------------------------------------------------------------------ graph
    def build(self, routed: bool) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
        """Emit the nodes into ``self.g``; returns (graph inputs, graph outputs)."""
        s, W = self.spec, self.weights
        trim = routed  # the main graph; the one-token .decode graph (routed=False) has no rows to drop
        routed = routed and s.has_experts
        pre = self._preliminaries()
        route = self._router(routed)
        rows = self._last_rows(pre)
        keep = self._kept_rows(pre, rows, routed) if trim else None
        presents: list[str] = []
        h, x, m = self.rms_norm(pre["x"], W["layers.0.attn_norm.weight"], "layers.0.attn_norm"), pre["x"], None
        cross = s.cross_attention
        if cross is not None:
            xattn.preliminaries(self, pre)
        for i in range(s.num_layers):
            if cross is not None and i % cross.interval == 0:  # a gated cross-attention block before layer i
                x = xattn.block(self, i // cross.interval, x, pre)
                h = self.rms_norm(x, W[f"layers.{i}.attn_norm.weight"], f"layers.{i}.attn_norm_after_cross")
            h, x, m = self._layer(i, h, x, route, pre, presents, keep if i == s.num_layers - 1 else None)
        self._last_logits(m, x, keep["pick"] if keep else rows)
        ins, outs = self.io(routed)
        if trim:
            self.g.initializers.append(onnx.numpy_helper.from_array(np.array(0, np.int64), DECODER_ALL_ROWS))
            ins.append(helper.make_tensor_value_info(DECODER_ALL_ROWS, TensorProto.INT64, []))
        return ins, outs

    def _preliminaries(self) -> dict[str, str]:
        """Per-run values (all tiny): the residual stream, batch/sequence shapes, KV lengths."""
        g, c, H = self.g, self.g.const, self.spec.hidden_size
        pre = {"x": g.op("Reshape", ["inputs_embeds", c([-1, H])], "embeds_2d")}  # residual stream [N, H]
        pre["bs"] = bs = g.op("Shape", ["position_ids"], "batch_seq")  # [B, S]
        pre["batch"] = g.op("Gather", [bs, c(0)], "batch", axis=0)
        pre["shape_bsd"] = g.op("Concat", [bs, c([-1])], "shape_bs_", axis=0)
        pre["seqlens"] = seqlens = g.op("ReduceSum", ["attention_mask", c([1])], "mask_sum", keepdims=0)  # [B]
        pre["seqlens_k"] = g.op("Cast", [g.op("Sub", [seqlens, c(1)], "seqlens_minus_1")], "seqlens_k",
                                to=TensorProto.INT32)
        pre["total"] = total = g.op("Gather", [g.op("Shape", ["attention_mask"], "mask_shape"), c(1)], "total_len",
                                    axis=0)
        pre["total_i32"] = g.op("Cast", [total], "total_sequence_length", to=TensorProto.INT32)
        return pre

    def _router(self, routed: bool, rows: str | None = None
                ) -> Callable[[str, str, int, Callable[[str, str], str]], str]:
        """``route(h, block, i, f)``: f(rows, expert) on each expert's rows of h [N, in], put back in place;
        ``rows``: h holds only these flattened positions (the last layer's kept rows)."""
        g, c = self.g, self.g.const
        if not routed:
            return lambda h, block, i, f: f(h, "language")
        tt = g.op("Reshape", ["token_type", c([-1])], "token_type_flat")
        if rows is not None:
            tt = g.op("Gather", [tt, rows], "token_type_kept", axis=0)
        is_v = g.op("Equal", [tt, c(1)], "is_vision")
        vidx = g.op("Reshape", [g.op("NonZero", [is_v], "vision_nonzero"), c([-1])], "vision_rows")
        lidx = g.op("Reshape", [g.op("NonZero", [g.op("Not", [is_v], "is_language")], "language_nonzero"),
                                c([-1])], "language_rows")
        perm = g.op("Concat", [lidx, vidx], "expert_order", axis=0)  # rows grouped by expert
        n = g.op("Shape", [perm], "num_rows")
        inv = g.op("ScatterND", [g.op("ConstantOfShape", [n], "zeros_rows",
                                      value=helper.make_tensor("v", TensorProto.INT64, [1], [0])),
                                 g.op("Unsqueeze", [perm, c([1])], "expert_order_2d"),
                                 g.op("Range", [c(0), g.op("Squeeze", [n, c([0])], "n_scalar"), c(1)],
                                      "arange_rows")],
                   "inverse_order")  # inv[p] = where row p sits in the grouped order

        def route(h: str, block: str, i: int, f) -> str:
            p = f"layers.{i}.{block}"
            hl = g.op("Gather", [h, lidx], f"{p}.language.rows", axis=0)
            hv = g.op("Gather", [h, vidx], f"{p}.vision.rows", axis=0)
            grouped = g.op("Concat", [f(hl, "language"), f(hv, "vision")], f"{p}.grouped", axis=0)
            return g.op("Gather", [grouped, inv], f"{p}.scatter", axis=0)

        return route

    def _matmul(self, inp: str, key: str, name: str) -> str:
        return self.g.op("MatMul", [inp, self.weights[key]], name)

    def _mlp(self, i: int) -> Callable[[str, str], str]:
        g = self.g

        def f(h: str, e: str) -> str:
            p = f"layers.{i}.{e}.mlp"
            gate = self._matmul(h, f"layers.{i}.{e}.gate.weight", f"{p}.gate")
            up = self._matmul(h, f"layers.{i}.{e}.up.weight", f"{p}.up")
            act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{p}.sigmoid")], f"{p}.silu")
            return self._matmul(g.op("Mul", [act, up], f"{p}.act_mul"), f"layers.{i}.{e}.down.weight", f"{p}.down")
        return f

    def _proj(self, i: int, role: str) -> Callable[[str, str], str]:
        def f(h: str, e: str) -> str:
            name = f"layers.{i}.{e}.{role}"
            y = self._matmul(h, f"{name}.weight", name)
            if f"{name}.bias" in self.weights:
                y = self.g.op("Add", [y, self.weights[f"{name}.bias"]], f"{name}.add_bias")
            return y
        return f

    def _layer(self, i: int, h: str, x: str, route, pre: dict[str, str], presents: list[str],
               keep: dict[str, Any] | None = None) -> tuple[str, str, str]:
        """One decoder layer: (normed input, residual) -> (next normed input, residual, mlp output);
        ``keep`` (the last layer): after attention, only the rows ``keep["rows"]`` go on."""
        s, g, W, c = self.spec, self.g, self.weights, self.g.const
        p = f"layers.{i}"
        qkv = route(h, "qkv", i, self._proj(i, "qkv"))
        qkv = g.op("Reshape", [qkv, pre["shape_bsd"]], f"{p}.qkv_3d")
        q, k, v = g.op("Split", [qkv, c([self.q_out, self.kv_out, self.kv_out])], f"{p}.qkv_split",
                       outputs=3, axis=-1)
        rope = dict(domain=MS_DOMAIN, interleaved=0)
        q = g.op("RotaryEmbedding", [q, "position_ids", W["rope.cos"], W["rope.sin"]], f"{p}.rope_q",
                 num_heads=s.num_heads, **rope)
        k = g.op("RotaryEmbedding", [k, "position_ids", W["rope.cos"], W["rope.sin"]], f"{p}.rope_k",
                 num_heads=s.num_kv_heads, **rope)
        pk, pv = f"present.{i}.key", f"present.{i}.value"
        attn, _, _ = g.op("GroupQueryAttention",
                          [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", pre["seqlens_k"],
                           pre["total_i32"]],
                          f"{p}.attn", outputs=[f"{p}.attn/out", pk, pv], domain=MS_DOMAIN,
                          num_heads=s.num_heads, kv_num_heads=s.num_kv_heads, do_rotary=0)
        presents += [pk, pv]
        attn = g.op("Reshape", [attn, c([-1, self.q_out])], f"{p}.attn_2d")
        if keep is not None:
            attn = g.op("Gather", [attn, keep["rows"]], f"{p}.attn_kept", axis=0)
            x = g.op("Gather", [x, keep["rows"]], f"{p}.residual_kept", axis=0)
            route = keep["route"]
        o = route(attn, "o", i, self._proj(i, "o"))
        h, _, _, x = g.op("SkipSimplifiedLayerNormalization", [o, x, W[f"{p}.ffn_norm.weight"]],
                          f"{p}.ffn_norm", outputs=4, domain=MS_DOMAIN, epsilon=s.rms_norm_eps)
        m = route(h, "mlp", i, self._mlp(i))
        if i + 1 < s.num_layers:
            h, _, _, x = g.op("SkipSimplifiedLayerNormalization", [m, x, W[f"layers.{i + 1}.attn_norm.weight"]],
                              f"layers.{i + 1}.attn_norm", outputs=4, domain=MS_DOMAIN, epsilon=s.rms_norm_eps)
        return h, x, m

    def _last_rows(self, pre: dict[str, str]) -> str:
        """[B] flattened index of each row's last valid position: b * S + max(seqlens_k[b] - (total - S), 0)."""
        g, c = self.g, self.g.const
        bs, seqlens, total = pre["bs"], pre["seqlens"], pre["total"]
        seq = g.op("Gather", [bs, c(1)], "seq_len", axis=0)
        last = g.op("Max", [g.op("Sub", [g.op("Sub", [seqlens, c(1)], "last_slot"),
                                         g.op("Sub", [total, seq], "past_len")], "last_in_seq"), c(0)],
                    "last_index")
        return g.op("Add", [g.op("Mul", [g.op("Range", [c(0), pre["batch"], c(1)], "batch_range"), seq], "row_base"),
                            last], "last_rows")

    def _kept_rows(self, pre: dict[str, str], rows: str, routed: bool) -> dict[str, Any]:
        """The last layer's rows after attention: ``rows`` [B], or all N positions when the
        ``last_layer_all_rows`` input is 1; ``pick``: where each row's last position then sits in them
        (``[0, B)`` or ``rows``). Both are one Slice of a concatenation, so no branch is needed."""
        g, c = self.g, self.g.const
        flag, batch = DECODER_ALL_ROWS, pre["batch"]
        n = g.op("Gather", [g.op("Shape", [pre["x"]], "rows_shape"), c(0)], "num_positions", axis=0)
        start = g.op("Reshape", [g.op("Mul", [flag, batch], "kept_start"), c([1])], "kept_start_1d")
        end = g.op("Reshape", [g.op("Add", [batch, g.op("Mul", [flag, n], "kept_extra")], "kept_end"), c([1])],
                   "kept_end_1d")
        kept = g.op("Slice", [g.op("Concat", [rows, g.op("Range", [c(0), n, c(1)], "all_positions")], "kept_choices",
                                   axis=0), start, end], "kept_rows")
        pick_end = g.op("Reshape", [g.op("Add", [batch, g.op("Mul", [flag, batch], "pick_shift")], "pick_end"),
                                    c([1])], "pick_end_1d")
        pick = g.op("Slice", [g.op("Concat", [g.op("Range", [c(0), batch, c(1)], "kept_range"), rows],
                                   "pick_choices", axis=0), start, pick_end], "last_in_kept")
        return {"rows": kept, "pick": pick, "route": self._router(routed, kept)}

    def _last_logits(self, m: str, x: str, rows: str) -> None:
        """Logits of the positions ``rows`` of the last layer's output ``m`` (and residual ``x``)."""
        g, c, W, s = self.g, self.g.const, self.weights, self.spec
        m_last = g.op("Gather", [m, rows], "last_mlp", axis=0)
        x_last = g.op("Gather", [x, rows], "last_residual", axis=0)
        hf, _, _, _ = g.op("SkipSimplifiedLayerNormalization", [m_last, x_last, W["final_norm.weight"]],
                           "final_norm", outputs=4, domain=MS_DOMAIN, epsilon=s.rms_norm_eps)
        logits = self._matmul(hf, "lm_head.weight", "lm_head")
        if self.dtype != np.float32:
            logits = g.op("Cast", [logits], "logits_fp32", to=TensorProto.FLOAT)
        g.op("Reshape", [logits, c([0, 1, -1])], "logits_3d", outputs=["logits"])

    def rms_norm(self, x: str, weight: str, name: str) -> str:
        """``weight * x / sqrt(mean(x^2) + eps)`` in float32, as plain ops (onnxruntime fuses the pattern into
        SimplifiedLayerNormalization, which lives in its default domain where onnx.checker rejects it)."""
        g, c = self.g, self.g.const
        h = x if self.dtype == np.float32 else g.op("Cast", [x], f"{name}.to_fp32", to=TensorProto.FLOAT)
        var = g.op("ReduceMean", [g.op("Pow", [h, c(2.0, np.float32)], f"{name}.square")], f"{name}.mean",
                   axes=[-1], keepdims=1)
        std = g.op("Sqrt", [g.op("Add", [var, c(self.spec.rms_norm_eps, np.float32)], f"{name}.add_eps")],
                   f"{name}.sqrt")
        h = g.op("Div", [h, std], f"{name}.normalize")
        if self.dtype != np.float32:
            h = g.op("Cast", [h], f"{name}.to_fp16", to=_ONNX_DTYPE[self.dtype])
        return g.op("Mul", [weight, h], name)

    def io_specs(self, routed: bool) -> tuple[tuple[IOSpec, ...], tuple[IOSpec, ...]]:
        s, dt = self.spec, self.dtype.name
        kv = ("batch", s.num_kv_heads, "past_sequence", s.head_dim)
        kv_out = ("batch", s.num_kv_heads, "total_sequence", s.head_dim)
        ins = [IOSpec("inputs_embeds", dt, ("batch", "sequence", s.hidden_size)),
               IOSpec("attention_mask", "int64", ("batch", "total_sequence")),
               IOSpec("position_ids", "int64", ("batch", "sequence"))]
        if routed and s.has_experts:
            ins.append(IOSpec("token_type", "int64", ("batch", "sequence")))
        if s.cross_attention is not None:
            ins += [IOSpec(xattn.MEMORY, dt, (1, "memory", s.cross_attention.memory_width)),
                    IOSpec(xattn.MEDIA, "int64", ("batch", "sequence"))]
        outs = [IOSpec("logits", "float32", ("batch", 1, s.vocab_size))]
        for i in range(s.num_layers):
            ins += [IOSpec(f"past_key_values.{i}.key", dt, kv), IOSpec(f"past_key_values.{i}.value", dt, kv)]
            outs += [IOSpec(f"present.{i}.key", dt, kv_out), IOSpec(f"present.{i}.value", dt, kv_out)]
        return tuple(ins), tuple(outs)

    def io(self, routed: bool):
        ins, outs = self.io_specs(routed)
        to_vi = lambda spec: helper.make_tensor_value_info(spec.name, _ONNX_DTYPE[np.dtype(spec.dtype)],
                                                           list(spec.shape))
        return [to_vi(x) for x in ins], [to_vi(x) for x in outs]


# ------------------------------------------------------------------- public API
def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}; got {precision!r}")


@contextmanager
def _atomic_files(paths: Sequence[Path]) -> Iterator[list[Path]]:
    """Write to temporary names next to ``paths``; rename all of them only on success."""
    tmps = [p.with_name(f".{p.name}.partial") for p in paths]
    try:
        yield tmps
        for tmp, final in zip(tmps, paths):
            if tmp.exists():
                os.replace(tmp, final)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


def write_decoder_graphs(graphs: Sequence[tuple[Path, bool]], data_path: Path,
                         make_builder: Callable[["_Graph"], Any], to_model: Callable[..., onnx.ModelProto]):
    """Write every weight once into ``data_path``, then each ``(path, routed)`` graph that the
    builder emits (``to_model(g, builder, inputs, outputs)`` wraps it), all sharing that data
    file. Atomic: temporary files are renamed into place only once every file is written and
    checked; a failure leaves none of them. Returns ``(graph, builder)``."""
    tmp_data = data_path.with_name(f".{data_path.name}.partial")
    tmps = [p.with_name(f".{p.name}.partial") for p, _ in graphs]
    data = ExternalDataFile(tmp_data)  # the graphs name data_path; renamed there before they are checked
    try:
        try:
            g = _Graph(data, location=data_path.name)
            b = make_builder(g)
            b.write_weights()
        finally:
            data.close()
        os.replace(tmp_data, data_path)
        weights = list(g.initializers)
        for (_, routed), tmp in zip(graphs, tmps):
            g.nodes, g.initializers, g._consts, g._used = [], list(weights), {}, {}
            ins, outs = b.build(routed)
            tmp.write_bytes(to_model(g, b, ins, outs).SerializeToString())
            onnx.checker.check_model(str(tmp))  # from the file, so the data file's name resolves (not read)
        for (final, _), tmp in zip(graphs, tmps):
            os.replace(tmp, final)
    except BaseException:
        data_path.unlink(missing_ok=True)
        raise
    finally:
        for tmp in tmps + [tmp_data]:
            tmp.unlink(missing_ok=True)
    return g, b


def export_text_decoder(tensors: TensorSource, spec: DecoderSpec, out_path: str | os.PathLike,
                        precision: str = "fp32", max_length: int | None = None,
                        decode_model: bool = False) -> DecoderGraph:
    """Write ``out_path`` (the graph) and ``<out_path>.data`` (every weight) from checkpoint tensors.

    ``max_length`` (default ``spec.max_position_embeddings``) bounds the position ids the
    rotary tables cover and is the KV buffer length a runtime should allocate.
    ``decode_model`` also writes the routing-free ``<stem>.decode.onnx`` (models with experts).
    """
    _check_precision(precision)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    max_length = int(max_length or spec.max_position_embeddings)
    data_path = out.with_name(out.name + ".data")
    decode_path = out.with_name(out.stem + ".decode" + out.suffix) if decode_model and spec.has_experts else None
    graphs = [(out, True)] + ([(decode_path, False)] if decode_path else [])

    def to_model(g: _Graph, b: _DecoderBuilder, ins, outs) -> onnx.ModelProto:
        return helper.make_model(helper.make_graph(g.nodes, "text_decoder", ins, outs, g.initializers),
                                 opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
                                 ir_version=IR_VERSION, producer_name="vlmexport")

    g, b = write_decoder_graphs(graphs, data_path,
                                lambda g: _DecoderBuilder(tensors, spec, g, precision, max_length), to_model)
    ins, outs = b.io_specs(True)
    log.info("wrote %s (+ %.1f MB of weights)", out, g.weight_bytes / 1e6)
    return DecoderGraph(path=out, data_path=data_path, inputs=ins, outputs=outs, precision=precision,
                        data_bytes=g.weight_bytes, decode_path=decode_path, max_length=max_length,
                        num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                        hidden_size=spec.hidden_size, vocab_size=spec.vocab_size, has_experts=spec.has_experts)


def export_token_embedding(tensors: TensorSource, spec: DecoderSpec, out_path: str | os.PathLike,
                           precision: str = "fp32") -> Path:
    """The embedding table [vocab, hidden] as ``weight`` in a safetensors file (read with safetensors.numpy)."""
    from safetensors.numpy import save_file

    _check_precision(precision)
    table = _to_numpy(tensors.get(spec.embed))
    if table.shape != (spec.vocab_size, spec.hidden_size):
        raise ValueError(f"checkpoint tensor {spec.embed} has shape {list(table.shape)}; expected "
                         f"[{spec.vocab_size}, {spec.hidden_size}]")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_files([out]) as (tmp,):
        save_file({"weight": np.ascontiguousarray(table.astype(PRECISIONS[precision], copy=False))}, str(tmp),
                  metadata={"precision": precision})
    return out
