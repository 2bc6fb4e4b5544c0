"""Would TensorRT's ONNX parser accept this graph? An audit against its operator table.

The table is data (``tensorrt_ops.json``, sources named in it): one per target,

- ``jetson-orin``: TensorRT 10.3 (JetPack 6.x), opset 9-20;
- ``desktop``: TensorRT 10.15, opset 9-24.

Every node is checked for: domain (the parser reads the default ONNX domain only;
``com.microsoft`` ops would need plugins), operator support, the data type of its
input (the table's "Supported Types" column), the parser's documented restrictions that
a graph can violate (``axes`` inputs that must be constants, ``ScatterND`` reduction,
``LayerNormalization``'s extra outputs, ``TopK`` sorting), the model's opset against
the documented range, and the explicit-quantization rules of TensorRT 10
("Working with Quantized Types"):

- ``QuantizeLinear`` / ``DequantizeLinear``: zero point absent or zero (symmetric);
  ``QuantizeLinear`` writes INT8 (or FP8), never blocked;
- block-quantized ``DequantizeLinear`` (``block_size`` > 0; ONNX opset >= 21): weight-only,
  so its input is an initializer, INT4 (FP4 too on desktop), 2-D, ``axis`` 0 or 1,
  ``block_size`` divides that dimension and the scale is 2-D with exactly
  ``dim / block_size`` rows along ``axis`` (the other dimension equal).

Nothing here imports TensorRT: the audit runs wherever onnx does, which is the point
(the build checks the TensorRT profile on a machine without a GPU).
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import onnx
from onnx import TensorProto, numpy_helper

from ..core.errors import VlmexportError

TABLE = Path(__file__).with_name("tensorrt_ops.json")
TARGETS = ("jetson-orin", "desktop")
DEFAULT_DOMAINS = ("", "ai.onnx")
BLOCKED_DQ_MIN_OPSET = 21

_TYPE_NAMES = {TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
               TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.INT8: "INT8",
               TensorProto.UINT8: "UINT8", TensorProto.BOOL: "BOOL", TensorProto.INT4: "INT4",
               TensorProto.DOUBLE: "DOUBLE", TensorProto.FLOAT8E4M3FN: "FP8", TensorProto.UINT4: "UINT4",
               TensorProto.INT16: "INT16", TensorProto.UINT16: "UINT16", TensorProto.UINT32: "UINT32",
               TensorProto.UINT64: "UINT64", TensorProto.STRING: "STRING"}
if hasattr(TensorProto, "FLOAT4E2M1"):
    _TYPE_NAMES[TensorProto.FLOAT4E2M1] = "FP4"
# which input's type the table's "Supported Types" column is about (default: input 0)
_TYPED_INPUT = {"Where": 1}
# inputs the parser needs as constants (when the op's row names the restriction)
_AXES_INPUT = {"Squeeze": 1, "Unsqueeze": 1, "Slice": 3, "ReduceMean": 1, "ReduceSum": 1, "ReduceMax": 1,
               "ReduceMin": 1, "ReduceProd": 1, "ReduceL1": 1, "ReduceL2": 1, "ReduceLogSum": 1,
               "ReduceLogSumExp": 1, "ReduceSumSquare": 1}
_BLOCKED_TYPES = {"jetson-orin": ("INT4",), "desktop": ("INT4", "FP4")}


class AuditError(VlmexportError):
    """An unknown target, or a graph TensorRT's parser would reject (build-time check)."""


@dataclass(frozen=True)
class Finding:
    node: str
    op: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op}): {self.reason}"


@dataclass
class AuditResult:
    """One graph against one target's table."""

    path: str
    target: str
    tensorrt: str
    opset: int
    nodes: int = 0
    ops: Counter = field(default_factory=Counter)
    findings: list[Finding] = field(default_factory=list)  # what would not parse
    warnings: list[str] = field(default_factory=list)  # what parses with the parser's caveats

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict:
        return {"target": self.target, "tensorrt": self.tensorrt, "opset": self.opset, "nodes": self.nodes,
                "op_types": len(self.ops), "unsupported": [str(f) for f in self.findings],
                "warnings": list(self.warnings), "passed": self.ok}


@lru_cache(maxsize=1)
def load_table() -> dict:
    return json.loads(TABLE.read_text())


def target_table(target: str) -> dict:
    targets = load_table()["targets"]
    if target not in targets:
        raise AuditError(f"unknown TensorRT target {target!r}; choose one of {sorted(targets)}")
    return targets[target]


def _types(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, TensorProto], set[str]]:
    """Element type of every value (from shape inference), initializers by name, Constant outputs."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    types: dict[str, int] = {n: t.data_type for n, t in inits.items()}
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    except Exception:  # noqa: BLE001 - a graph inference cannot type still gets the other checks
        inferred = g
    for vi in list(inferred.input) + list(inferred.value_info) + list(inferred.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    consts = {o for n in g.node if n.op_type == "Constant" for o in n.output}
    return types, inits, consts


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _is_zero(t: TensorProto | None, base_dir: str) -> bool:
    if t is None:
        return False
    arr = numpy_helper.to_array(t, base_dir=base_dir)
    return not arr.any()


def _check_qdq(node, types, inits, consts, target, opset, base_dir) -> Iterable[str]:
    ins = list(node.input) + ["", "", ""]
    zp = ins[2]
    if zp and not (zp in inits and _is_zero(inits[zp], base_dir)):
        yield f"zero point {zp!r} is not an all-zero initializer (TensorRT quantization is symmetric)"
    block = int(_attr(node, "block_size", 0) or 0)
    if node.op_type == "QuantizeLinear":
        out_t = _TYPE_NAMES.get(types.get(zp, TensorProto.UINT8) if zp else int(_attr(node, "output_dtype", 0) or 0)
                                or TensorProto.UINT8)
        if out_t not in ("INT8", "FP8"):
            yield f"quantizes to {out_t}; TensorRT's QuantizeLinear writes INT8 or FP8 (give an INT8 zero point)"
        if block:
            yield "block-quantized QuantizeLinear: TensorRT blocks weights only (DequantizeLinear of an initializer)"
        return
    x = ins[0]
    x_t = _TYPE_NAMES.get(types.get(x, 0), "unknown")
    if x_t == "INT4" and x not in inits:
        yield "INT4 input is not an initializer: TensorRT supports INT4 for weight-only quantization"
    if not block:
        return
    if opset < BLOCKED_DQ_MIN_OPSET:
        yield f"block_size needs ONNX opset >= {BLOCKED_DQ_MIN_OPSET}; the model declares {opset}"
    if x_t not in _BLOCKED_TYPES[target]:
        yield f"block quantization of {x_t}; TensorRT ({target}) blocks {list(_BLOCKED_TYPES[target])} weights only"
    if x not in inits:
        yield "block-quantized input is not an initializer (TensorRT blocks weights only)"
        return
    dims = list(inits[x].dims)
    axis = int(_attr(node, "axis", 1))
    axis = axis + len(dims) if axis < 0 else axis
    if len(dims) != 2:
        yield f"block-quantized weight of rank {len(dims)}; TensorRT blocks 2-D weights"
        return
    if axis not in (0, 1) or dims[axis] % block:
        yield f"block_size {block} does not divide dimension {axis} ({dims[axis] if axis in (0, 1) else '?'})"
        return
    scale = ins[1]
    if scale not in inits:
        yield "block scales are not an initializer"
        return
    want = list(dims)
    want[axis] //= block
    if list(inits[scale].dims) != want:
        yield f"block scale shape {list(inits[scale].dims)}; expected {want} (2-D, one row per block)"


def _add_finding(findings: list, node: str, op: str, reason: str) -> None:
    findings.append(Finding(node, op, reason))


def audit_model(model: onnx.ModelProto | str | Path, target: str = "jetson-orin", base_dir: str = "") -> AuditResult:
    """Check every node of ``model`` (a path, read without its external data) against ``target``."""
    t = target_table(target)
    path = ""
    if not isinstance(model, onnx.ModelProto):
        path = str(model)
        base_dir = base_dir or str(Path(model).parent)
        model = onnx.load(path, load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 0)
    r = AuditResult(path, target, t["tensorrt"], opset)
    if opset < t["opset_min"]:
        r.findings.append(Finding("<model>", "", f"opset {opset} is older than TensorRT {t['tensorrt']}'s "
                                                 f"{t['opset_min']}"))
    elif opset > t["opset_max"]:
        r.warnings.append(f"opset {opset} is newer than TensorRT {t['tensorrt']}'s documented range "
                          f"{t['opset_min']}-{t['opset_max']}; whether it parses is not established by this table")
    types, inits, consts = _types(model)
    ops = t["ops"]
    for node in model.graph.node:
        r.nodes += 1
        r.ops[(node.domain or "", node.op_type)] += 1
        name = node.name or (node.output[0] if node.output else node.op_type)
        bad = functools.partial(_add_finding, r.findings, name, node.op_type)
        if node.domain not in DEFAULT_DOMAINS:
            bad(f"domain {node.domain!r}: TensorRT's ONNX parser reads the default domain only (it would need a "
                "plugin)")
            continue
        row = ops.get(node.op_type)
        if row is None or not row["supported"]:
            bad(f"not supported by TensorRT {t['tensorrt']}'s ONNX parser")
            continue
        idx = _TYPED_INPUT.get(node.op_type, 0)
        typed = node.input[idx] if len(node.input) > idx else ""
        if node.op_type == "ConstantOfShape":
            typed = node.output[0]
        if typed and row["types"]:
            tname = _TYPE_NAMES.get(types.get(typed, 0))
            if tname is None:
                r.warnings.append(f"{name} ({node.op_type}): type of {typed!r} unknown (shape inference gave none)")
            elif tname not in row["types"]:
                bad(f"input {typed!r} is {tname}; TensorRT {t['tensorrt']} supports {row['types']}")
        restr = row.get("restrictions", "")
        ai = _AXES_INPUT.get(node.op_type)
        if (ai is not None and "`axes`" in restr and len(node.input) > ai and node.input[ai]
                and node.input[ai] not in inits and node.input[ai] not in consts):
            bad(f"`axes` input {node.input[ai]!r} is computed; TensorRT {t['tensorrt']} needs a constant")
        if node.op_type == "ScatterND" and (_attr(node, "reduction", b"none") or b"none") not in (b"none", "none"):
            bad("ScatterND reduction is not supported")
        if node.op_type == "LayerNormalization" and sum(1 for o in node.output[1:] if o):
            bad("only the first output of LayerNormalization is supported")
        if node.op_type == "TopK" and int(_attr(node, "sorted", 1)) != 1:
            bad("TopK needs sorted=1")
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            for reason in _check_qdq(node, types, inits, consts, target, opset, base_dir):
                bad(reason)
    for vi in list(model.graph.input) + list(model.graph.output):
        tname = _TYPE_NAMES.get(vi.type.tensor_type.elem_type, "unknown")
        if tname in ("DOUBLE",):
            r.warnings.append(f"graph IO {vi.name!r} is DOUBLE: TensorRT casts it to FP32")
        elif tname not in ("FP32", "FP16", "BF16", "INT32", "INT64", "INT8", "UINT8", "BOOL"):
            r.findings.append(Finding(vi.name, "<io>", f"graph IO of type {tname}"))
    return r


def audit_files(paths: Iterable[str | Path], targets: Iterable[str] = TARGETS) -> list[AuditResult]:
    return [audit_model(p, t) for p in paths for t in targets]


def format_audit(results: Iterable[AuditResult], root: str | Path | None = None) -> str:
    """Human-readable report: one line per graph and target, then what would not parse and why."""
    lines = []
    for r in results:
        name = str(Path(r.path).relative_to(root)) if root and r.path else r.path
        status = "ok" if r.ok else f"{len(r.findings)} unsupported node(s)"
        lines.append(f"{name}  [{r.target}: TensorRT {r.tensorrt}, opset {r.opset}]  {r.nodes} nodes, "
                     f"{len(r.ops)} op types: {status}")
        lines += [f"    x {f}" for f in r.findings[:50]]
        if len(r.findings) > 50:
            lines.append(f"    ... and {len(r.findings) - 50} more")
        lines += [f"    ! {w}" for w in dict.fromkeys(r.warnings)]
    return "\n".join(lines)


def audit_bundle(path: str | Path, targets: Iterable[str] = TARGETS) -> tuple[list[AuditResult], str]:
    """Audit a bundle's TensorRT-profile graphs (every precision); a bundle without that profile
    gets its ONNX graphs audited instead, which shows why they need the profile. Returns the
    results and which format was audited."""
    from ..bundle import Bundle

    b = Bundle.open(path, verify="none")
    fmt = "tensorrt" if any(a.format == "tensorrt" for a in b.artifacts) else "onnx"
    paths: list[Path] = []
    for a in b.artifacts:
        if a.format != fmt or not a.file.endswith(".onnx"):
            continue
        paths.append(b.file(a.file))
        paths += [b.file(d["file"]) for d in a.data_files if d["file"].endswith(".onnx")]
    if not paths:
        raise AuditError(f"{b.root}: holds no ONNX graph to audit; build it with `vlmexport build --format tensorrt`")
    targets = list(targets)
    for t in targets:
        target_table(t)
    return [audit_model(p, t) for p in paths for t in targets], fmt
