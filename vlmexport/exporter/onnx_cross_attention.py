"""Gated cross-attention blocks of a ``text_decoder`` graph (``DecoderSpec.cross_attention``).

A decoder whose images are attended to, not spliced into its sequence (Flamingo), gets two
more inputs::

    cross_attention_memory [1, memory, 2 * blocks * hidden]  every image's rows (the connector's
                                              output, in image order): each row holds every
                                              block's key and value, [K_0 | V_0 | K_1 | ...]
    media [batch, sequence] int64             the image each position attends to (-1: none)

and, before decoder layer ``j * interval``, block ``j``::

    x += tanh(alpha_attn) * gate * softmax(q K_j^T / sqrt(d) + mask) V_j W_o,   q = RMSNorm(x) W_q
    x += tanh(alpha_ffn) * SwiGLU(RMSNorm(x))

``mask`` lets a position see only the rows of its image (row r belongs to image
r // memory_tokens); ``gate`` is 0 where ``media`` is -1 (no image yet), as transformers'
Idefics zeroes those rows. Scores and softmax run in float32 in every precision (a row
that sees no image must stay finite before it is gated off).

The keys and values are computed once per image (by the connector), not projected again
from features at every step: see docs/export.md ("Cross-attention memory") for the
measurement behind that choice.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from ..models.spec import DecoderSpec

MEMORY, MEDIA = "cross_attention_memory", "media"


def has_cross_attention(spec: DecoderSpec) -> bool:
    return spec.cross_attention is not None


def write_weights(b) -> None:
    """Stream every block's weights into the decoder's data file (``b``: the decoder builder)."""
    x, s = b.spec.cross_attention, b.spec
    H, F = s.hidden_size, s.intermediate_size
    if x.memory_width != 2 * x.num_blocks * H:
        raise ValueError(f"cross-attention memory_width {x.memory_width} must be 2 * blocks * hidden "
                         f"({2 * x.num_blocks * H}): every block's keys and values")
    for j in range(x.num_blocks):
        p = f"cross.{j}"
        b._vector(f"{p}.attn_norm.weight", x.attn_norm.format(i=j), H)
        b._linear(f"{p}.q.weight", (x.q.format(i=j),), (H,), H)
        b._linear(f"{p}.o.weight", (x.o.format(i=j),), (H,), H)
        b._vector(f"{p}.ffn_norm.weight", x.ffn_norm.format(i=j), H)
        b._linear(f"{p}.gate.weight", (x.gate.format(i=j),), (F,), H)
        b._linear(f"{p}.up.weight", (x.up.format(i=j),), (F,), H)
        b._linear(f"{p}.down.weight", (x.down.format(i=j),), (H,), F)
        for role, name in (("alpha_attn", x.alpha_attn), ("alpha_ffn", x.alpha_ffn)):
            t = b.t.get(name.format(i=j))
            a = np.asarray(t.detach().float().cpu().numpy() if hasattr(t, "detach") else t).reshape(-1)
            if a.size not in (1, H):
                raise ValueError(f"checkpoint tensor {name.format(i=j)} has {a.size} values; a gate has 1 or {H}")
            # tanh folded at export: the gate is a constant of the trained model
            b.weights[f"{p}.{role}"] = b.g.weight(f"{p}.{role}.tanh", (a.size,), b.dtype,
                                                 iter([np.tanh(a.astype(np.float32)).astype(b.dtype)]))


def preliminaries(b, pre: dict[str, str]) -> None:
    """Per-run values shared by every block: the additive mask [B, 1, S, M] and the gate [N, 1]."""
    g, c, x = b.g, b.g.const, b.spec.cross_attention
    rows = g.op("Shape", [MEMORY], "cross.memory_shape")
    m = g.op("Gather", [rows, c(1)], "cross.memory_rows", axis=0)
    image_of_row = g.op("Div", [g.op("Range", [c(0), m, c(1)], "cross.rows"), c(x.memory_tokens)], "cross.image_of_row")
    sees = g.op("Equal", [g.op("Unsqueeze", [MEDIA, c([-1])], "cross.media_3d"), image_of_row], "cross.sees")  # [B,S,M]
    lowest = float(np.finfo(np.float32).min)  # transformers' additive mask value
    bias = g.op("Where", [sees, c(0.0, np.float32), c(lowest, np.float32)], "cross.mask_bias")
    pre["cross.bias"] = g.op("Unsqueeze", [bias, c([1])], "cross.mask_bias_4d")
    gate = g.op("Cast", [g.op("GreaterOrEqual", [MEDIA, c(0)], "cross.has_image")], "cross.gate_bs",
                to=_onnx_dtype(b.dtype))
    pre["cross.gate"] = g.op("Reshape", [gate, c([-1, 1])], "cross.gate")
    pre["cross.heads_shape"] = g.op("Concat", [pre["bs"], c([b.spec.num_heads, b.spec.head_dim])],
                                    "cross.q_shape", axis=0)


def block(b, j: int, x: str, pre: dict[str, str]) -> str:
    """Block ``j`` on the residual stream ``x`` [N, hidden]; returns the new residual stream."""
    g, c, s, W = b.g, b.g.const, b.spec, b.weights
    p = f"cross.{j}"
    nh, hd = s.num_heads, s.head_dim
    # this block's precomputed keys / values: [1, heads, head_dim, M] and [1, heads, M, head_dim]
    H = s.hidden_size
    mem_heads = c([1, -1, nh, hd])

    def columns(lo: int, name: str) -> str:
        cols = g.op("Slice", [MEMORY, c([lo]), c([lo + H]), c([2])], f"{p}.{name}_cols")
        return g.op("Reshape", [cols, mem_heads], f"{p}.{name}_4d")

    k = g.op("Transpose", [columns(2 * j * H, "k")], f"{p}.k_t", perm=[0, 2, 3, 1])
    v = g.op("Transpose", [columns((2 * j + 1) * H, "v")], f"{p}.v_t", perm=[0, 2, 1, 3])
    h = b.rms_norm(x, W[f"{p}.attn_norm.weight"], f"{p}.attn_norm")
    q = g.op("Reshape", [b._matmul(h, f"{p}.q.weight", f"{p}.q"), pre["cross.heads_shape"]], f"{p}.q_4d")
    q = g.op("Transpose", [q], f"{p}.q_t", perm=[0, 2, 1, 3])  # [B, heads, S, head_dim]
    scores = g.op("MatMul", [q, k], f"{p}.scores")
    if b.dtype != np.float32:
        scores = g.op("Cast", [scores], f"{p}.scores_fp32", to=TensorProto.FLOAT)
    scores = g.op("Add", [g.op("Mul", [scores, c(1.0 / np.sqrt(hd), np.float32)], f"{p}.scaled"), pre["cross.bias"]],
                  f"{p}.masked")
    probs = g.op("Softmax", [scores], f"{p}.softmax", axis=-1)
    if b.dtype != np.float32:
        probs = g.op("Cast", [probs], f"{p}.probs_model_dtype", to=_onnx_dtype(b.dtype))
    out = g.op("Transpose", [g.op("MatMul", [probs, v], f"{p}.context")], f"{p}.context_t", perm=[0, 2, 1, 3])
    out = g.op("Reshape", [out, c([-1, s.num_heads * hd])], f"{p}.context_2d")
    a = g.op("Mul", [b._matmul(out, f"{p}.o.weight", f"{p}.o"), pre["cross.gate"]], f"{p}.gated")
    x = g.op("Add", [x, g.op("Mul", [a, W[f"{p}.alpha_attn"]], f"{p}.alpha_attn")], f"{p}.residual_attn")
    h = b.rms_norm(x, W[f"{p}.ffn_norm.weight"], f"{p}.ffn_norm")
    gate = b._matmul(h, f"{p}.gate.weight", f"{p}.mlp.gate")
    up = b._matmul(h, f"{p}.up.weight", f"{p}.mlp.up")
    act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{p}.mlp.sigmoid")], f"{p}.mlp.silu")
    m = b._matmul(g.op("Mul", [act, up], f"{p}.mlp.act_mul"), f"{p}.down.weight", f"{p}.mlp.down")
    return g.op("Add", [x, g.op("Mul", [m, W[f"{p}.alpha_ffn"]], f"{p}.alpha_ffn")], f"{p}.residual_ffn")


def _onnx_dtype(dtype: np.dtype) -> int:
    return TensorProto.FLOAT16 if np.dtype(dtype) == np.float16 else TensorProto.FLOAT
