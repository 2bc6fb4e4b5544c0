"""The routing-free one-token graph of a weight-only quantized decoder, sharing its weights.

The ONNX decoder routes every projection by expert (exporter/onnx_decoder.py): each decode
step, whose one token is text, still runs the NonZero / Gather / Concat bookkeeping and the
visual expert's MatMulNBits on zero rows (bench-s int4: 161 MatMulNBits, 149 Gathers and 50
Concats per step). The exporter's ``<stem>.decode.onnx`` is the same decoder without the
routing (language expert only), written beside the fp32 graph over the fp32 weights.

This module writes the quantized counterpart without quantizing anything again: the fp32
decode graph's nodes, with each MatMul replaced by the MatMulNBits node that the quantizer
wrote for the same projection in the routed quantized graph, and every initializer taken
from that graph, so the decode file is a graph only (~0.1 MB) that reads the quantized
graph's own ``.onnx.data``: the two graphs run byte-identical weights by construction
(whatever the algorithm: RTN, GPTQ with its calibration, a recipe's fp32 exceptions).
"""

from __future__ import annotations

import re
from pathlib import Path

import onnx

from ..core.errors import VlmexportError

DECODE_SUFFIX = ".decode"  # <stem>.decode.onnx, as the exporter names the fp32 one
_QUANT_NODE = re.compile(r"^(?P<name>.+)_Q(?P<bits>\d+)$")  # onnxruntime's MatMulNBits quantizer: <MatMul name>_Q4


def decode_graph_path(graph: str | Path) -> Path:
    g = Path(graph)
    return g.with_name(g.stem + DECODE_SUFFIX + g.suffix)


def tensor_bytes(t: onnx.TensorProto) -> int:
    """Bytes of an initializer's data, in its external file or inline."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return int({e.key: e.value for e in t.external_data}.get("length", 0))
    return len(t.raw_data)


def derive_quantized_decode_graph(quantized: str | Path, fp32_decode: str | Path, out: str | Path | None = None
                                  ) -> tuple[Path, int]:
    """Write ``out`` (default ``<quantized stem>.decode.onnx`` beside ``quantized``): the routing-free
    graph of ``fp32_decode`` running the weights of the routed ``quantized`` graph (module doc).
    Returns its path and the bytes of the weights it reads (a runtime session loads its own copy).

    ``out`` must sit in ``quantized``'s folder: the initializers keep their external-data locations,
    which are relative to the graph file."""
    qpath, dpath = Path(quantized), Path(fp32_decode)
    out = Path(out) if out is not None else decode_graph_path(qpath)
    if out.resolve().parent != qpath.resolve().parent:
        raise VlmexportError(f"{out}: write the decode graph beside {qpath.name}; its weights are referenced by "
                             "relative path")
    q = onnx.load(str(qpath), load_external_data=False)
    d = onnx.load(str(dpath), load_external_data=False)
    q_init = {t.name: t for t in q.graph.initializer}
    d_init = {t.name: t for t in d.graph.initializer}
    quantized_nodes = {}
    for n in q.graph.node:
        m = _QUANT_NODE.match(n.name)
        if n.op_type == "MatMulNBits" and m:
            quantized_nodes[m["name"]] = n

    nodes = []
    for n in d.graph.node:
        qn = quantized_nodes.get(n.name) if n.op_type == "MatMul" else None
        if qn is None:
            nodes.append(n)
            continue
        new = onnx.NodeProto()
        new.CopyFrom(qn)
        new.input[0] = n.input[0]
        del new.output[:]
        new.output.extend(n.output)
        nodes.append(new)

    used = {i for n in nodes for i in n.input if i}
    inits = []
    for name in sorted(used & (set(q_init) | set(d_init))):
        if name in q_init:
            inits.append(q_init[name])
            continue
        t = d_init[name]
        if t.data_location == onnx.TensorProto.EXTERNAL:  # a weight the quantized graph does not hold
            raise VlmexportError(f"{dpath.name}: initializer {name!r} is not in {qpath.name}; export the fp32 and "
                                 "quantized decoders from the same checkpoint with this vlmexport version")
        inits.append(t)  # a small inline constant of the decode graph
    # every MatMul on a weight must have found its quantized twin (or be kept as a MatMul in q too)
    stale = [n.name for n in nodes if n.op_type == "MatMul" and any(
        i in d_init and d_init[i].data_location == onnx.TensorProto.EXTERNAL and i not in q_init for i in n.input)]
    if stale:
        raise VlmexportError(f"{qpath.name}: no quantized node for {stale[:3]} of {dpath.name}; rebuild the bundle")

    g = onnx.helper.make_graph(nodes, d.graph.name, d.graph.input, d.graph.output, inits)
    model = onnx.helper.make_model(g, opset_imports=q.opset_import, ir_version=q.ir_version,
                                   producer_name="vlmexport")
    tmp = out.with_name(out.name + ".tmp")  # beside the data file: the checker resolves it from there
    try:
        onnx.save(model, str(tmp))
        onnx.checker.check_model(str(tmp))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out, sum(tensor_bytes(t) for t in inits)
