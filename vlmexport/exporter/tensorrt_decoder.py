"""The ``text_decoder`` part as a TensorRT-profile ONNX graph: standard ONNX ops only.

TensorRT's ONNX parser reads the default domain only (no ``com.microsoft`` ops), and
JetPack 6's TensorRT 10.3 has no ONNX ``Attention`` / ``RotaryEmbedding`` /
``RMSNormalization`` (added to the parser in 10.14-10.15). So this graph spells
everything out; the weights are written exactly as :mod:`.onnx_decoder` writes them
(its ``_DecoderBuilder.write_weights``: streamed, ``[in, out]`` MatMul layout, the same
rotary tables), only the nodes differ::

    inputs_embeds [batch, sequence, hidden]        position_ids [batch, sequence] int64
    token_type [batch, sequence] int64 (routed graph; 1 = visual expert)
    write_index [1] int64: the KV-buffer slot of the first new position (= cached length)
    past_key_values.{i}.key / .value [batch, kv_heads, kv_capacity, head_dim]
      -> logits [batch, 1, vocab] float32 (the last position)
      -> present.{i}.key / .value [batch, kv_heads, kv_capacity, head_dim]

- **Static KV buffer**: ``present = ScatterND(past, [b, h, write_index + s], new)``; the
  buffer never grows (``kv_capacity`` is fixed by the runtime, at most ``max_length``,
  the rows of the rotary tables). Every row of a batch shares ``write_index``.
  ``ScatterND`` rather than ``ScatterElements``: TensorRT 10.3's parser imports the latter
  through a plugin (onnx-tensorrt changelog, 10.3), the former is the native scatter layer.
- **Attention** decomposed: ``softmax(q k^T / sqrt(hd) + mask) v`` over the whole buffer
  with an additive mask (slot ``t`` is visible to new position ``s`` iff
  ``t <= write_index + s``), scores and softmax in float32 in the fp16 graph. Grouped
  KV heads without repeating K/V: q is viewed as ``[batch, kv_heads, group * seq, hd]``
  (the mask tiled ``group`` times), which is what ``repeat_kv`` computes.
- **RoPE** (rotate-half) from the tables ``rope.cos`` / ``rope.sin`` gathered at
  ``position_ids`` (positions are not slots under ``hf_cogvlm``): ``x cos + rot(x) sin``.
- **RMSNorm** as Pow / ReduceMean / Add / Sqrt / Div in float32 (``_DecoderBuilder.rms_norm``).
- **Expert routing without data-dependent shapes**: the routed graph runs both experts'
  projections on every position and picks per position with ``Where(token_type == 1)``
  (no NonZero / Gather-by-index, so every shape follows from the input shapes and the
  engine has no host sync). It costs the visual expert's MatMuls on text positions and
  vice versa (2x the routed FLOPs of a prefill; measured in docs/tensorrt.md). Decode
  steps (one text token) run ``<stem>.decode.onnx``, the routing-free language-only graph
  over the same data file, so the per-token cost is not doubled. TensorRT-LLM's CogVLM
  instead routes a fixed image slice (one image at a fixed offset); this project's prompts
  interleave any number of images, which a fixed slice cannot express.
- **The last layer keeps the last position** once its keys and values are written: its
  attention output, residual and expert choice are sliced to ``[batch, 1, ...]``, so its
  output projection and MLP (both experts, in the routed graph) run on one position, as the
  onnxruntime graph's last layer and llama.cpp's do. The logits read the last position of
  every row (the graph has no attention mask: a batch's rows are of equal length). bench-s:
  ~5% of a prefill's projection FLOPs (docs/tensorrt.md).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..core.errors import ConfigError
from ..models.spec import DecoderSpec
from .onnx_common import IR_VERSION, OPSET, IOSpec, TensorSource
from .onnx_decoder import _ONNX_DTYPE, DecoderGraph, _check_precision, _DecoderBuilder, write_decoder_graphs

__all__ = ["TRT_DECODE_SUFFIX", "TensorRTDecoderGraph", "export_tensorrt_decoder"]

log = logging.getLogger(__name__)

TRT_DECODE_SUFFIX = ".decode"  # <stem>.decode.onnx: the routing-free one-token graph
MASK_VALUE = -1e9  # additive mask of an invisible slot (scores are float32)
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class TensorRTDecoderGraph(DecoderGraph):
    """What :func:`export_tensorrt_decoder` wrote; ``decode_path`` is always set for expert models."""

    kv_layout: str = "static"


class _TrtDecoderBuilder(_DecoderBuilder):
    """The weights of :class:`_DecoderBuilder`, emitted as a plain-op static-cache graph."""

    opset = OPSET

    def weight_value(self, key: str) -> str:
        """The float value of projection ``key`` (a quantized builder dequantizes here)."""
        return self.weights[key]

    def rms_norm(self, x: str, weight: str, name: str) -> str:
        if self.opset < 18:
            return super().rms_norm(x, weight, name)
        # opset 18 moved ReduceMean's axes from an attribute to an input
        g, c = self.g, self.g.const
        h = x if self.dtype == np.float32 else g.op("Cast", [x], f"{name}.to_fp32", to=TensorProto.FLOAT)
        var = g.op("ReduceMean", [g.op("Pow", [h, c(2.0, np.float32)], f"{name}.square"), c([-1])], f"{name}.mean",
                   keepdims=1)
        std = g.op("Sqrt", [g.op("Add", [var, c(self.spec.rms_norm_eps, np.float32)], f"{name}.add_eps")],
                   f"{name}.sqrt")
        h = g.op("Div", [h, std], f"{name}.normalize")
        if self.dtype != np.float32:
            h = g.op("Cast", [h], f"{name}.to_fp16", to=_ONNX_DTYPE[self.dtype])
        return g.op("Mul", [weight, h], name)

    def build(self, routed: bool) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
        s, g = self.spec, self.g
        c = g.const
        self.dequantized: dict[str, str] = {}
        routed = routed and s.has_experts
        nh, kvh, hd = s.num_heads, s.num_kv_heads, s.head_dim
        group = nh // kvh

        # ---- per-run preliminaries
        shape = g.op("Shape", ["inputs_embeds"], "embeds_shape")
        batch = g.op("Gather", [shape, c([0])], "batch", axis=0)  # [1]
        seq = g.op("Gather", [shape, c([1])], "seq", axis=0)  # [1]
        # [S] cache slots of the new positions. Range over shapes only, then + write_index: a Range whose
        # bounds came from write_index would make that input a TensorRT shape tensor (host-side, profiled)
        steps = g.op("Range", [c(0), g.op("Squeeze", [seq, c([0])], "seq_scalar"), c(1)], "new_steps")
        slots = g.op("Add", [steps, "write_index"], "slots")
        cap = g.op("Gather", [g.op("Shape", ["past_key_values.0.key"], "kv_shape"), c(2)], "kv_capacity", axis=0)
        visible = g.op("LessOrEqual", [g.op("Unsqueeze", [g.op("Range", [c(0), cap, c(1)], "all_slots"), c([0])],
                                            "all_slots_row"),
                                       g.op("Unsqueeze", [slots, c([1])], "slots_col")], "visible")  # [S, T]
        mask = g.op("Where", [visible, c(0.0, np.float32), c(MASK_VALUE, np.float32)], "mask")
        mask = g.op("Tile", [mask, c([group, 1])], "mask_grouped") if group > 1 else mask  # [G*S, T]
        # ScatterND indices [B, kv_heads, S, 3]: (b, h, slot) of every new key/value row
        idx_shape = g.op("Concat", [batch, c([kvh]), seq, c([1])], "scatter_shape", axis=0)
        b_idx = g.op("Reshape", [g.op("Range", [c(0), g.op("Squeeze", [batch, c([0])], "batch_scalar"), c(1)],
                                      "batch_range"), c([-1, 1, 1, 1])], "b_idx")
        parts = [g.op("Expand", [b_idx, idx_shape], "b_grid"),
                 g.op("Expand", [c(np.arange(kvh).reshape(1, kvh, 1, 1)), idx_shape], "h_grid"),
                 g.op("Expand", [g.op("Reshape", [slots, c([1, 1, -1, 1])], "t_idx"), idx_shape], "t_grid")]
        scatter_idx = g.op("Concat", parts, "scatter_indices", axis=-1)
        # rotary tables at the position ids, both halves: [B, S, 1, hd]
        rope = {}
        for name in ("cos", "sin"):
            half = g.op("Gather", [self.weights[f"rope.{name}"], "position_ids"], f"rope_{name}_half", axis=0)
            rope[name] = g.op("Unsqueeze", [g.op("Concat", [half, half], f"rope_{name}_full", axis=-1), c([2])],
                              f"rope_{name}")
        is_v = None
        if routed:
            is_v = g.op("Unsqueeze", [g.op("Equal", ["token_type", c(1)], "is_vision"), c([-1])], "is_vision_col")

        def matmul(h: str, key: str, name: str) -> str:
            return g.op("MatMul", [h, self.weight_value(key)], name)

        def route(h: str, i: int, f, pick: str | None = None) -> str:
            """``pick``: the per-position expert choice for ``h``'s positions (default every position's)."""
            if not routed:
                return f(h, "language")
            return g.op("Where", [pick or is_v, f(h, "vision"), f(h, "language")], f"layers.{i}.{f.__name__}.route")

        def rotate(x: str, heads: int, name: str) -> str:
            """RoPE on [B, S, heads*hd] -> [B, heads, S, hd]."""
            x = g.op("Reshape", [x, c([0, 0, heads, hd])], f"{name}.heads")
            x1, x2 = g.op("Split", [x, c([hd // 2, hd // 2])], f"{name}.halves", outputs=2, axis=-1)
            rot = g.op("Concat", [g.op("Neg", [x2], f"{name}.neg"), x1], f"{name}.rotated", axis=-1)
            y = g.op("Add", [g.op("Mul", [x, rope["cos"]], f"{name}.cos"),
                             g.op("Mul", [rot, rope["sin"]], f"{name}.sin")], f"{name}.rope")
            return g.op("Transpose", [y], f"{name}.bhsd", perm=[0, 2, 1, 3])

        x = "inputs_embeds"  # the residual stream [B, S, H]
        presents: list[str] = []
        for i in range(s.num_layers):
            p = f"layers.{i}"
            h = self.rms_norm(x, self.weights[f"{p}.attn_norm.weight"], f"{p}.attn_norm")

            def qkv(hh, e, i=i):
                y = matmul(hh, f"layers.{i}.{e}.qkv.weight", f"layers.{i}.{e}.qkv")
                if f"layers.{i}.{e}.qkv.bias" in self.weights:  # Qwen2-style attention bias
                    y = g.op("Add", [y, self.weights[f"layers.{i}.{e}.qkv.bias"]], f"layers.{i}.{e}.qkv.bias_add")
                return y

            q, k, v = g.op("Split", [route(h, i, qkv), c([self.q_out, self.kv_out, self.kv_out])], f"{p}.qkv_split",
                           outputs=3, axis=-1)
            q, k = rotate(q, nh, f"{p}.q"), rotate(k, kvh, f"{p}.k")
            v = g.op("Transpose", [g.op("Reshape", [v, c([0, 0, kvh, hd])], f"{p}.v.heads")], f"{p}.v.bhsd",
                     perm=[0, 2, 1, 3])
            keys = g.op("ScatterND", [f"past_key_values.{i}.key", scatter_idx, k], outputs=[f"present.{i}.key"])
            values = g.op("ScatterND", [f"past_key_values.{i}.value", scatter_idx, v], outputs=[f"present.{i}.value"])
            presents += [keys, values]
            attn = self.attention(q, keys, values, mask, p)
            pick = None
            if i == s.num_layers - 1:  # the keys and values of every position are written: the rest is the logits'
                attn, x = (g.op("Slice", [v_, c([-1]), c([INT64_MAX]), c([1])], f"{p}.{n}_last")
                           for v_, n in ((attn, "attn"), (x, "residual")))
                if routed:
                    pick = g.op("Slice", [is_v, c([-1]), c([INT64_MAX]), c([1])], f"{p}.is_vision_last")

            def o(hh, e, i=i):
                return matmul(hh, f"layers.{i}.{e}.o.weight", f"layers.{i}.{e}.o")

            x = g.op("Add", [x, route(attn, i, o, pick)], f"{p}.attn_residual")
            h = self.rms_norm(x, self.weights[f"{p}.ffn_norm.weight"], f"{p}.ffn_norm")

            def mlp(hh, e, i=i):
                q_ = f"layers.{i}.{e}"
                gate = matmul(hh, f"{q_}.gate.weight", f"{q_}.gate")
                act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{q_}.sigmoid")], f"{q_}.silu")
                up = matmul(hh, f"{q_}.up.weight", f"{q_}.up")
                return matmul(g.op("Mul", [act, up], f"{q_}.act_mul"), f"{q_}.down.weight", f"{q_}.down")

            x = g.op("Add", [x, route(h, i, mlp, pick)], f"{p}.mlp_residual")

        hf = self.rms_norm(x, self.weights["final_norm.weight"], "final_norm")  # x: the last position [B, 1, H]
        logits = matmul(hf, "lm_head.weight", "lm_head")
        if self.dtype != np.float32:
            logits = g.op("Cast", [logits], "logits_fp32", to=TensorProto.FLOAT)
        g.op("Identity", [logits], "logits_out", outputs=["logits"])
        return self.io(routed)

    def attention(self, q: str, keys: str, values: str, mask: str, p: str) -> str:
        """q [B, nh, S, hd] against the whole buffer [B, kvh, T, hd] -> [B, S, nh*hd]."""
        s, g = self.spec, self.g
        c = g.const
        kvh, hd = s.num_kv_heads, s.head_dim
        qg = g.op("Reshape", [q, c([0, kvh, -1, hd])], f"{p}.q_grouped")  # [B, kvh, G*S, hd]
        qg = g.op("Mul", [qg, c(1.0 / math.sqrt(hd), self.dtype)], f"{p}.q_scaled")
        scores = g.op("MatMul", [qg, g.op("Transpose", [keys], f"{p}.keys_t", perm=[0, 1, 3, 2])], f"{p}.scores")
        if self.dtype != np.float32:
            scores = g.op("Cast", [scores], f"{p}.scores_fp32", to=TensorProto.FLOAT)
        probs = g.op("Softmax", [g.op("Add", [scores, mask], f"{p}.masked")], f"{p}.probs", axis=-1)
        if self.dtype != np.float32:
            probs = g.op("Cast", [probs], f"{p}.probs_fp16", to=_ONNX_DTYPE[self.dtype])
        out = g.op("MatMul", [probs, values], f"{p}.context")  # [B, kvh, G*S, hd]
        out = g.op("Reshape", [out, c([0, s.num_heads, -1, hd])], f"{p}.context_heads")
        out = g.op("Transpose", [out], f"{p}.context_bshd", perm=[0, 2, 1, 3])
        return g.op("Reshape", [out, c([0, 0, self.q_out])], f"{p}.context_flat")

    def io_specs(self, routed: bool) -> tuple[tuple[IOSpec, ...], tuple[IOSpec, ...]]:
        s, dt = self.spec, self.dtype.name
        kv = ("batch", s.num_kv_heads, "kv_capacity", s.head_dim)
        ins = [IOSpec("inputs_embeds", dt, ("batch", "sequence", s.hidden_size)),
               IOSpec("position_ids", "int64", ("batch", "sequence"))]
        if routed and s.has_experts:
            ins.append(IOSpec("token_type", "int64", ("batch", "sequence")))
        ins.append(IOSpec("write_index", "int64", (1,)))
        outs = [IOSpec("logits", "float32", ("batch", 1, s.vocab_size))]
        for i in range(s.num_layers):
            ins += [IOSpec(f"past_key_values.{i}.key", dt, kv), IOSpec(f"past_key_values.{i}.value", dt, kv)]
            outs += [IOSpec(f"present.{i}.key", dt, kv), IOSpec(f"present.{i}.value", dt, kv)]
        return tuple(ins), tuple(outs)


def check_tensorrt_decoder(spec: DecoderSpec) -> None:
    """One ConfigError line where the TensorRT profile cannot express the decoder."""
    if spec.cross_attention is not None:
        raise ConfigError("TensorRT profile: a decoder with gated cross-attention to the images is not supported "
                          "yet (its static-cache graph has no cross-attention memory input); build --format onnx")


def export_tensorrt_decoder(tensors: TensorSource, spec: DecoderSpec, out_path: str | os.PathLike,
                            precision: str = "fp16", max_length: int | None = None,
                            decode_model: bool = True, builder: type[_TrtDecoderBuilder] | None = None,
                            quant_precision: str | None = None) -> TensorRTDecoderGraph:
    """Write the TensorRT-profile decoder ``out_path`` (+ ``.data``; + ``<stem>.decode.onnx``).

    ``max_length`` (default ``spec.max_position_embeddings``): rows of the rotary tables,
    the largest KV capacity. ``decode_model``: also write the routing-free one-token graph
    (expert models only; plain decoders need no second graph).
    """
    _check_precision(precision)
    check_tensorrt_decoder(spec)
    if spec.num_heads % spec.num_kv_heads or spec.head_dim % 2:
        raise ValueError(f"num_heads {spec.num_heads} must be a multiple of num_kv_heads {spec.num_kv_heads} and "
                         f"head_dim {spec.head_dim} even")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    max_length = int(max_length or spec.max_position_embeddings)
    data_path = out.with_name(out.name + ".data")
    decode_path = (out.with_name(out.stem + TRT_DECODE_SUFFIX + out.suffix)
                   if decode_model and spec.has_experts else None)
    graphs = [(out, True)] + ([(decode_path, False)] if decode_path else [])

    def to_model(g, b, ins, outs) -> onnx.ModelProto:
        used = {x for n in g.nodes for x in n.input}  # the decode graph drops the visual expert's weights
        inits = [t for t in g.initializers if t.name in used]
        model = helper.make_model(helper.make_graph(g.nodes, "text_decoder", ins, outs, inits),
                                  opset_imports=[helper.make_opsetid("", b.opset)],
                                  ir_version=IR_VERSION if b.opset <= OPSET else 10, producer_name="vlmexport")
        model.metadata_props.add(key="profile", value="tensorrt")
        return model

    g, b = write_decoder_graphs(graphs, data_path,
                                lambda g: (builder or _TrtDecoderBuilder)(tensors, spec, g, precision, max_length),
                                to_model)
    ins, outs = b.io_specs(True)
    log.info("wrote %s (TensorRT profile, + %.1f MB of weights)", out, g.weight_bytes / 1e6)
    return TensorRTDecoderGraph(path=out, data_path=data_path, inputs=ins, outputs=outs,
                                precision=quant_precision or precision,
                                data_bytes=g.weight_bytes, decode_path=decode_path, max_length=max_length,
                                num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                                hidden_size=spec.hidden_size, vocab_size=spec.vocab_size,
                                has_experts=spec.has_experts, opset=b.opset)
