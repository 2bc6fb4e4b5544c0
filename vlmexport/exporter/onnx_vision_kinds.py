"""ONNX graphs of the vision-encoder spec types beyond the ViT (``models/vision_specs.py``).

Written into a :class:`~vlmexport.exporter.onnx_common.GraphBuilder` that
:func:`~vlmexport.exporter.onnx_vision.export_vision_encoder` opens; that function picks
the writer by the spec's type and hands in its checked weight access (``w``, with
``get(name, shape=, numel=)`` / ``has(name)``) and its ``linear`` / ``layer_norm``
helpers, so this module does not import it back.

ViTDet (SAM-style) on ``pixels`` [B, C, S, S] -> [B, grid * grid, output_channels]:
patch Conv -> channels last [B, g, g, D] -> + absolute positions -> blocks -> neck.
A windowed block pads the grid with zeros to whole windows (as transformers'
``window_partition`` does), attends inside each window, and crops the padding again.
Decomposed relative positions: ``rel_h[b, h, w, k] = q[b, h, w] . R_h[h - k + s - 1]``
(likewise along the width) added to the scores as ``rel_h[..., :, None] + rel_w[..., None, :]``.
The tables are written gathered by offset ([s, hd, s], one per block and axis: a
weight-derived tensor, as a fused QKV weight is), so the graph needs no index constant.
Shapes stay at most 4-D for every Reshape constant (the inline-constant rule of the
exporters: only shapes and scalars inline).

Parallel encoders: each branch's graph on the same pixels, zero-padded on the feature
axis to the widest branch, concatenated along the tokens in branch order. Every weight
keeps its checkpoint name and every value a fresh name, so calibration (one range per
tensor) keeps each encoder's activation statistics apart.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..models.vision_specs import ParallelVisionSpec, ViTDetSpec

Linear = Callable[[Any, Any, str, str, tuple[int, int]], str]  # (g, w, x, weight name, (out, in)) -> value
LayerNorm = Callable[[Any, Any, str, str, str | None, int, float], str]


def _bias(name: str) -> str:
    return name[: -len("weight")] + "bias"


def _pad_axis(g, x: str, axis: int, pad: int, tail: tuple[int, ...]) -> str:
    """Append ``pad`` zeros along ``axis`` of ``x`` [B, *tail] (tail: the sizes after the batch axis)."""
    if pad == 0:
        return x
    shape = list(tail)
    shape[axis - 1] = pad
    batch = g.node("Shape", [x], start=0, end=1)
    zeros = g.node("Expand", [g.const(0.0), g.node("Concat", [batch, g.const(shape)], axis=0)])
    return g.node("Concat", [x, zeros], axis=axis)


def _rel_table(g, w, name: str, size: int, head_dim: int) -> str:
    """``R[i - k + size - 1]`` for query i, key k, as [size, head_dim, size] (MatMul's right side)."""
    table = w.get(name, (2 * size - 1, head_dim))
    idx = torch.arange(size)[:, None] - torch.arange(size)[None, :] + (size - 1)
    return g.weight(name + ".by_offset", table[idx].permute(0, 2, 1).contiguous())


def _vitdet_attention(g, w, spec: ViTDetSpec, i: int, x: str, s: int, linear: Linear) -> str:
    """Attention over [Bw, s, s, D] regions (windows, or the whole grid) -> [Bw, s, s, D]."""
    D, H, hd, n = spec.hidden_size, spec.num_heads, spec.head_dim, s * s
    qkv = linear(g, w, g.node("Reshape", [x, g.const([0, n, D])]), spec.qkv.format(i=i), (3 * D, D))
    q, k, v = (g.split_heads(t, H, hd) for t in g.node("Split", [qkv], n_outputs=3, axis=-1))  # [Bw, H, n, hd]
    scores = g.node("MatMul", [g.node("Mul", [q, g.const(hd ** -0.5)]), g.node("Transpose", [k], perm=[0, 1, 3, 2])])
    if spec.rel_pos_h is not None:
        q4 = g.node("Reshape", [q, g.const([-1, s, s, hd])])  # [B*H, h, w, hd]
        rel_h = g.node("MatMul", [q4, _rel_table(g, w, spec.rel_pos_h.format(i=i), s, hd)])  # [BH, h, w, kh]
        q_wh = g.node("Transpose", [q4], perm=[0, 2, 1, 3])
        rel_w = g.node("MatMul", [q_wh, _rel_table(g, w, spec.rel_pos_w.format(i=i), s, hd)])  # [BH, w, h, kw]
        rel_w = g.node("Transpose", [rel_w], perm=[0, 2, 1, 3])
        bias = g.node("Add", [g.node("Unsqueeze", [rel_h, g.const([4])]), g.node("Unsqueeze", [rel_w, g.const([3])])])
        scores = g.node("Add", [scores, g.node("Reshape", [bias, g.const([-1, H, n, n])])])
    out = g.merge_heads(g.node("MatMul", [g.node("Softmax", [scores], axis=-1), v]), D)
    out = linear(g, w, out, spec.o.format(i=i), (D, D))
    return g.node("Reshape", [out, g.const([-1, s, s, D])])


def _vitdet_block(g, w, spec: ViTDetSpec, i: int, x: str, linear: Linear, layer_norm: LayerNorm) -> str:
    D, gsz, ws = spec.hidden_size, spec.grid, spec.window_of(i)
    h = layer_norm(g, w, x, spec.norm1.format(i=i), _bias(spec.norm1.format(i=i)), D, spec.layer_norm_eps)
    if ws:
        nw = -(-gsz // ws)
        pad, full = nw * ws - gsz, nw * ws
        h = _pad_axis(g, _pad_axis(g, h, 1, pad, (gsz, gsz, D)), 2, pad, (full, gsz, D))
        # [B, nw*ws, nw*ws, D] -> [B*nw, ws, nw, ws*D] -> [B*nw, nw, ws, ws*D] -> windows [B*nw*nw, ws, ws, D]
        h = g.node("Transpose", [g.node("Reshape", [h, g.const([-1, ws, nw, ws * D])])], perm=[0, 2, 1, 3])
        h = _vitdet_attention(g, w, spec, i, g.node("Reshape", [h, g.const([-1, ws, ws, D])]), ws, linear)
        h = g.node("Transpose", [g.node("Reshape", [h, g.const([-1, nw, ws, ws * D])])], perm=[0, 2, 1, 3])
        h = g.node("Reshape", [h, g.const([-1, full, full, D])])
        if pad:
            h = g.node("Slice", [h, g.const([0, 0]), g.const([gsz, gsz]), g.const([1, 2])])
    else:
        h = _vitdet_attention(g, w, spec, i, h, gsz, linear)
    x = g.node("Add", [x, h])
    f = g.activation(linear(g, w, layer_norm(g, w, x, spec.norm2.format(i=i), _bias(spec.norm2.format(i=i)), D,
                                             spec.layer_norm_eps), spec.fc1.format(i=i), (spec.mlp_dim, D)),
                     spec.activation)
    return g.node("Add", [x, linear(g, w, f, spec.fc2.format(i=i), (D, spec.mlp_dim))])


def write_vitdet(g, w, spec: ViTDetSpec, pixels: Callable[[int], str], linear: Linear, layer_norm: LayerNorm) -> str:
    """The ViTDet encoder on ``pixels(channels)`` (the input's name) -> [B, grid * grid, output_channels]."""
    D, p, gsz, C = spec.hidden_size, spec.patch_size, spec.grid, spec.output_channels
    patch = w.get(spec.patch_weight, (D, None, p, p))
    conv_in = [pixels(patch.shape[1]), g.weight(spec.patch_weight, patch)]
    del patch
    if spec.patch_bias:
        conv_in.append(g.weight(spec.patch_bias, w.get(spec.patch_bias, numel=D), shape=(D,)))
    x = g.node("Transpose", [g.node("Conv", conv_in, kernel_shape=[p, p], strides=[p, p])], perm=[0, 2, 3, 1])
    if spec.positions:
        x = g.node("Add", [x, g.weight(spec.positions, w.get(spec.positions, (1, gsz, gsz, D)))])
    for i in range(spec.num_layers):
        x = _vitdet_block(g, w, spec, i, x, linear, layer_norm)
    x = g.node("Transpose", [x], perm=[0, 3, 1, 2])  # channels first for the neck's convolutions
    for conv, norm, k in ((spec.neck_conv1, spec.neck_norm1, 1), (spec.neck_conv2, spec.neck_norm2, 3)):
        cin = D if k == 1 else C
        x = g.node("Conv", [x, g.weight(conv, w.get(conv, (C, cin, k, k)))], kernel_shape=[k, k],
                   pads=[k // 2] * 4)
        x = layer_norm(g, w, g.node("Transpose", [x], perm=[0, 2, 3, 1]), norm, _bias(norm), C, spec.neck_eps)
        x = g.node("Transpose", [x], perm=[0, 3, 1, 2])
    x = g.node("Transpose", [x], perm=[0, 2, 3, 1])  # [B, g, g, C], tokens row-major
    return g.node("Reshape", [x, g.const([0, gsz * gsz, C])])


def write_parallel(g, spec: ParallelVisionSpec, pixels: Callable[[int], str],
                   write_branch: Callable[[Any, Callable[[int], str]], str]) -> str:
    """Each branch on the same ``pixels``, zero-padded to the widest, concatenated along the tokens."""
    width = spec.output_width
    feats = []
    for b in spec.branches:
        x = write_branch(b, pixels)
        feats.append(_pad_axis(g, x, 2, width - b.output_width, (b.output_tokens, width)))
    return g.node("Concat", feats, axis=1)
