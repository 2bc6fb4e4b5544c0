"""INT8 static QDQ for the vision parts, INT4/INT8 weight-only for the text decoder.

Vision encoder / connector (``quantize_int8_static``): onnxruntime's ``quantize_static``,
QDQ format, MatMul/Gemm/Conv, per-channel symmetric INT8 weights, symmetric INT8
activations (``ActivationSymmetric``: zero points 0, the form TensorRT builds INT8
engines from; the cpu target stores them as uint8 + 128, the same arithmetic in the form
onnxruntime's x86 integer kernels take). Calibration method, measured with
:func:`compare_calibration_methods` (max |int8 - fp32| / max |fp32| of the part's output on
32 test-split images; calibration from the val split; 8-bit weights, before the cpu target's 7):

==========================================  ========  ========  ==========
model, part (calibration images)            MinMax    Entropy   Percentile
==========================================  ========  ========  ==========
trained L1 snapshot, vision_encoder (512)   0.0812    0.0812    **0.0718**
trained L1 snapshot, connector (512)        0.0322    0.0322    **0.0276**
tiny seeded cogvlm, vision_encoder (64)     **0.0330**  0.0330    0.0403
tiny seeded cogvlm, connector (64)          0.0402    0.0402    **0.0386**
==========================================  ========  ========  ==========

Entropy equals MinMax exactly: ``quantize_static`` builds its entropy calibrator with 128
histogram bins and 128 quantized bins (not settable through ``extra_options`` in 1.31), so
the KL search has one candidate, the full range. Percentile (99.999) wins on the trained
model, which is what matters (a random tiny model has no outliers to clip), so it is the
default.

Text decoder (``quantize_weight_only``): ``MatMulNBitsQuantizer`` (``com.microsoft.MatMulNBits``),
block 128 for CPU and GPU alike (``--int4-block-size`` picks another), ``accuracy_level`` 4
(int8 compute on CPU; the CUDA kernel ignores the attribute).
The decoder's projections are ``MatMul(x, W)`` with ``W`` an initializer, so every expert
weight qualifies; the visual expert's MatMuls only ever see image-token rows (the graph
routes rows by Gather), so a data-driven algorithm run on the calibration pairs fits the
visual expert on image-token activations and the language expert on text tokens.
Algorithms: ``gptq`` (the default: :mod:`.gptq`, Frantar et al.'s algorithm fed the
calibration pairs, written through onnxruntime's node rewrite; onnxruntime 1.31's own
``GPTQWeightOnlyQuantConfig`` never propagates rounding error, see :mod:`.gptq`), ``rtn``
(``DefaultWeightOnlyQuantConfig``, the baseline) and ``hqq`` (``HQQWeightOnlyQuantConfig``,
data-free). INT8 weight-only is ``MatMulNBits`` with ``bits=8`` (runs on onnxruntime 1.31's
CPU provider), always with rtn (see :func:`quantize_weight_only`).

Measured on the shipped demo model (docs/quantization.md; 1,400 test prompts, fp32 71.93%,
int8 vision parts and int8 LM head in every row):

=============  ==========  ===========  ============  ==============  ==============
algorithm      block       accuracy     top-1 agree   mean cosine     min cosine
=============  ==========  ===========  ============  ==============  ==============
rtn            32          72.07%       99.64%        0.99859         0.955
**gptq**       32          **72.21%**   **99.64%**    **0.99964**     **0.970**
rtn            128         71.64%       99.14%        0.99926         0.925
**gptq**       128         **72.21%**   **99.64%**    **0.99964**     **0.975**
=============  ==========  ===========  ============  ==============  ==============

(The gpu rows with ``accuracy_level`` unset, as CUDA computes them. With int8 compute on a
CPU, block 128 gives 72.07%, top-1 99.50%, mean cosine 0.99949, and decodes bench-s 1.26-1.31x
faster than block 32 on a 2-vCPU EPYC, which made it the CPU default too: docs/quantization.md,
"Block size on a CPU".)

GPTQ cuts each expert's MatMul output error on the calibration rows about 4x (block 32:
language 0.040 -> 0.010, vision 0.058 -> 0.014; recorded per build as ``output_error``),
writes the same file format (same size, same decode speed) and costs 4 s of build time on the
demo model (bench-s: 4 min 5 s and 7.9 GB peak RSS against 1 min 35 s and 4.9 GB; the Hessians
and the sweep dominate). Hence gptq is the default.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from ..core.errors import ConfigError, DataError
from .calib import first_nonfinite, nonfinite_error
from .recipe import QuantRecipe

log = logging.getLogger(__name__)

INT8_OP_TYPES = ("MatMul", "Gemm", "Conv")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_CALIBRATION_METHOD = "percentile"  # see the measurement table in the module docstring
WEIGHT_ONLY_ALGORITHMS = ("rtn", "hqq", "gptq")
DEFAULT_ALGORITHM = "gptq"  # measured against rtn and hqq: docs/quantization.md
# 128 on both: on a CPU block 128 decodes bench-s 1.26-1.31x faster than block 32 for 0.14 points of demo
# accuracy (72.07% against 72.21%, both within the gate): docs/quantization.md, "Block size on a CPU"
CPU_BLOCK, GPU_BLOCK = 128, 128
INT4_BLOCK_SIZES = (32, 64, 128)  # MatMulNBits takes powers of two >= 16; these are the ones measured
# int8 QDQ weights on 7 bits for the cpu target (``quantize_static(reduce_range=True)``, onnxruntime's own
# advice for x86 without VNNI): there its QLinearMatMul sums pairs of uint8 x int8 products in int16 and
# saturates. Tiny seeded cogvlm, vision encoder, on a 2-vCPU AMD EPYC with AVX2 only: max |int8 - fp32| /
# max |fp32| 0.171 with 8-bit weights against 0.022 for the same QDQ graph's exact arithmetic
# (onnxruntime with graph optimizations off); 0.034 with 7-bit weights, fused kernel and exact
# arithmetic alike. A CPU with VNNI (or Arm's dot products) computes 8-bit weights exactly and pays
# the 7th bit's rounding instead: docs/quantization.md, "INT8 on CPUs without VNNI".
CPU_INT8_REDUCE_RANGE, GPU_INT8_REDUCE_RANGE = True, False
# int8 QDQ activations stored as uint8 with zero point 128 for the cpu target: the symmetric int8 codes
# plus 128, so every value and rounding is the same (the bench-s encoder's output bitwise equal). onnxruntime's
# x86 integer kernels take uint8 activations; from int8 ones its graph rewrite (QDQS8ToU8Transformer)
# converts a QuantizeLinear read by one DequantizeLinear only. A SwiGLU connector's gate, whose output
# feeds SiLU's Sigmoid and Mul, kept int8 and ran as DequantizeLinear + fp32 MatMul (bench-s connector,
# one image, 2-vCPU AVX2 EPYC, kernel time: 38 ms, fp32 35 ms; 18 ms with uint8 activations, every
# MatMul fused; docs/quantization.md). TensorRT builds from symmetric int8 (zero point 0), hence int8
# for the gpu target.
CPU_INT8_UNSIGNED_ACTIVATIONS, GPU_INT8_UNSIGNED_ACTIVATIONS = True, False
EXTERNAL_DATA_ABOVE = 1 << 30  # write initializers to <file>.data above 1 GiB (protobuf's limit is 2 GiB)


@dataclass(frozen=True)
class QuantizedPart:
    """What one quantization wrote."""

    part: str
    precision: str
    path: Path
    data_files: tuple[Path, ...]
    quantized_nodes: tuple[str, ...]
    kept_nodes: tuple[str, ...]
    settings: dict = field(default_factory=dict)

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.path, *self.data_files)


def _weight_nodes(model: onnx.ModelProto, op_types: Sequence[str]) -> list[tuple[str, str]]:
    """(node name, weight initializer name) of every node in op_types whose second input is an initializer."""
    inits = {i.name for i in model.graph.initializer}
    return [(n.name, n.input[1]) for n in model.graph.node
            if n.op_type in op_types and len(n.input) > 1 and n.input[1] in inits]


def _data_files(path: Path) -> tuple[Path, ...]:
    m = onnx.load(str(path), load_external_data=False)
    locs = {e.value for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
            for e in t.external_data if e.key == "location"}
    return tuple(path.parent / loc for loc in sorted(locs))


def _remove(path: Path) -> None:
    """Delete an ONNX file and its external data files."""
    for f in (path, *_data_files(path)):
        f.unlink(missing_ok=True)


def model_bytes(path: Path) -> int:
    return path.stat().st_size + sum(f.stat().st_size for f in _data_files(path))


def _save(model: onnx.ModelProto, out: Path, external: bool) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    data = out.with_name(out.name + ".data")
    data.unlink(missing_ok=True)
    if external:
        onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(out))


def _nonfinite_scales(model: onnx.ModelProto, base_dir: str = "") -> list[str]:
    """What got a NaN/inf scale: the activation a QuantizeLinear quantizes, or a MatMulNBits node
    (``base_dir``: where the model's external data lives, if it has any)."""
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "MatMulNBits"):
            t = inits.get(n.input[1] if n.op_type == "QuantizeLinear" else n.input[2])
            if t is not None and not np.all(np.isfinite(onnx.numpy_helper.to_array(t, base_dir=base_dir))):
                out.append(f"activation {n.input[0]}" if n.op_type == "QuantizeLinear" else f"node {n.name}")
    return out


def _dedicate_activation_dq(m: onnx.ModelProto, quantized: set[str]) -> int:
    """Give every quantized node its own activation DequantizeLinear; float consumers read the float tensor.

    ``quantize_static`` puts one Q -> DQ pair on a tensor and lets every consumer read the DQ.
    In a pre-LN ViT block the residual stream feeds both the next QKV / fc1 MatMul and the
    residual Add, so the Add adds a quantized copy of the residual (an error nobody asked
    for), and onnxruntime's QDQ fusion refuses a DQ with two consumers: those MatMuls run
    as DequantizeLinear + fp32 MatMul, slower than fp32 alone (bench-s ViT-B/16: 24 of 48
    weight MatMuls unfused, DequantizeLinear 45% of the run). Here, where a DQ feeds a
    quantized node, its other (float) consumers are pointed back at the Q's float input, and
    a pair shared by several quantized nodes (a SwiGLU's gate and up) is copied per node. A DQ read by float consumers
    only (a quantized MatMul's output pair, which onnxruntime folds into QLinearMatMul) is
    left alone. Edits ``m`` in place; returns the number of rewired inputs.
    """
    g = m.graph
    prod = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for k, i in enumerate(n.input):
            consumers.setdefault(i, []).append((n, k))
    outputs = {o.name for o in g.output}
    changed, new_nodes = 0, []
    for dq in list(g.node):
        if dq.op_type != "DequantizeLinear" or dq.output[0] in outputs:
            continue
        q = prod.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":  # a weight's DQ (initializer input): leave it
            continue
        users = consumers.get(dq.output[0], [])
        qusers = [(n, k) for n, k in users if n.name in quantized]
        if not qusers:  # e.g. a quantized MatMul's output pair read by its bias Add: QLinearMatMul needs it
            continue
        for n, k in users:
            if n.name not in quantized:
                n.input[k] = q.input[0]
                changed += 1
        for j, (n, k) in enumerate(qusers[1:], 1):
            # a whole Q -> DQ pair per node: onnxruntime's x86 S8->U8 rewrite (which its integer
            # kernels need) takes a Q with one DQ; a shared Q leaves the MatMul as DQ + fp32 MatMul
            q2 = onnx.helper.make_node("QuantizeLinear", list(q.input), [f"{q.output[0]}_dedicated{j}"],
                                       name=f"{q.name}_dedicated{j}")
            q2.attribute.extend(q.attribute)
            dq2 = onnx.helper.make_node("DequantizeLinear", [q2.output[0], *dq.input[1:]],
                                        [f"{dq.output[0]}_dedicated{j}"], name=f"{dq.name}_dedicated{j}")
            dq2.attribute.extend(dq.attribute)
            new_nodes.append((dq, [q2, dq2]))
            n.input[k] = dq2.output[0]
            changed += 1
    for dq, pair in new_nodes:  # keep topological order: right after the original DQ
        at = list(g.node).index(dq) + 1
        for node in reversed(pair):
            g.node.insert(at, node)
    return changed


def _unsigned_activations(m: onnx.ModelProto, base_dir: str = "") -> int:
    """Store the symmetric int8 activations of a QDQ graph as uint8 with zero point 128, in place.

    A QuantizeLinear's zero point initializer, shared with the DequantizeLinear nodes reading its
    codes, becomes 128 (uint8): the same values, clamps and roundings, 128 higher. Returns the number of
    zero points changed. A zero point that is not 0, or that another node reads (a weight's
    DequantizeLinear, say), is not what ``quantize_int8_static`` writes and raises. ``base_dir``:
    where the model's external data lives, if it has any."""
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    readers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    quantizers = [n for n in g.node if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2]]
    changed = 0
    for name in dict.fromkeys(n.input[2] for n in quantizers):
        t = inits.get(name)
        if t is None or t.data_type != onnx.TensorProto.INT8:
            continue
        z = onnx.numpy_helper.to_array(t, base_dir=base_dir)
        foreign = [n.name or n.op_type for n in readers.get(name, []) if not (
            n.op_type == "QuantizeLinear" or (n.op_type == "DequantizeLinear" and n.input[0] in prod
                                              and prod[n.input[0]].op_type == "QuantizeLinear"))]
        if z.any() or foreign:
            raise ValueError(f"activation zero point {name}: expected a symmetric int8 zero point read by its own "
                             f"QuantizeLinear/DequantizeLinear pairs only (also read by {foreign})")
        t.CopyFrom(onnx.numpy_helper.from_array(np.full(z.shape, 128, np.uint8), name))
        for n in readers[name]:  # opset 21's output_dtype, if set, must name the zero point's type
            for a in n.attribute:
                if a.name == "output_dtype" and a.i:
                    a.i = onnx.TensorProto.UINT8
        changed += 1
    return changed


def _nonfinite_cause(part: str, src: Path, reader) -> DataError | None:
    """The error naming the layer whose fp32 activations are NaN/inf on the calibration data, if any."""
    hit = first_nonfinite(src, reader)
    return nonfinite_error(part, *hit) if hit is not None else None


# --------------------------------------------------------------------- INT8 QDQ
def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    table = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}
    if name not in table:
        raise ConfigError(f"calibration method {name!r}: choose one of {list(table)}")
    return table[name]


def quantize_int8_static(part: str, src: str | os.PathLike, out: str | os.PathLike, reader,
                         recipe: QuantRecipe | None = None, method: str = DEFAULT_CALIBRATION_METHOD,
                         percentile: float = 99.999, quantize_bias: bool = True,
                         reduce_range: bool = False, unsigned_activations: bool = False) -> QuantizedPart:
    """INT8 QDQ (per-channel symmetric weights, symmetric activations) of an fp32 ONNX part.

    ``quantize_bias`` False keeps Conv/Gemm biases float (TensorRT has no INT32 DequantizeLinear;
    onnxruntime's CPU kernels take either). ``reduce_range`` writes the weights on 7 bits
    (-64..64): onnxruntime's x86 int8 GEMM without VNNI (AVX2, AVX-512 without VNNI) adds pairs
    of uint8 x int8 products in int16 (``vpmaddubsw``), which saturates with full-range weights;
    see :data:`CPU_INT8_REDUCE_RANGE`. ``unsigned_activations`` stores the activations' codes as uint8
    with zero point 128 (the same arithmetic; :data:`CPU_INT8_UNSIGNED_ACTIVATIONS`)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    src, out = Path(src), Path(out)
    model = onnx.load(str(src), load_external_data=False)
    nodes = _weight_nodes(model, INT8_OP_TYPES)
    chosen = recipe.select(part, nodes) if recipe is not None else {n: "int8" for n, _ in nodes}
    include = [n for n, p in chosen.items() if p == "int8"]
    kept = [n for n, p in chosen.items() if p != "int8"]
    if not include:
        raise ConfigError(f"{part}: the recipe quantizes none of its {len(nodes)} MatMul/Gemm/Conv nodes to int8")
    external = model_bytes(src) > EXTERNAL_DATA_ABOVE
    out.parent.mkdir(parents=True, exist_ok=True)
    reader.rewind()
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "CalibTensorRangeSymmetric": True,
             "CalibPercentile": percentile,
             "CalibMovingAverage": False, "QuantizeBias": quantize_bias}
    try:
        quantize_static(str(src), str(out), reader, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(INT8_OP_TYPES), per_channel=True, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, nodes_to_quantize=include or None, reduce_range=reduce_range,
                        nodes_to_exclude=kept or None, use_external_data_format=external,
                        calibrate_method=_method(method), extra_options=extra)
    except (ValueError, AssertionError) as e:
        # non-finite activations make onnxruntime fail without naming the tensor (the histogram
        # calibrators: "range ... is not finite"; MinMax with symmetric ranges: "scale issue"):
        # name the layer if that is the cause, else let the original error through
        cause = _nonfinite_cause(part, src, reader)
        if cause is not None:
            raise cause from None
        raise
    qdq = onnx.load(str(out), load_external_data=False)
    bad = _nonfinite_scales(qdq, str(out.parent))
    if bad:  # MinMax takes inf ranges silently and writes inf scales
        _remove(out)
        raise _nonfinite_cause(part, src, reader) or DataError(
            f"{part}: calibration produced a non-finite scale for {bad[0]}; check the checkpoint")
    rewired = _dedicate_activation_dq(qdq, set(include))
    try:
        shifted = _unsigned_activations(qdq, str(out.parent)) if unsigned_activations else 0
    except ValueError:  # not quantize_static's symmetric form: leave no file that looks converted
        _remove(out)
        raise
    if rewired or shifted:
        onnx.save(qdq, str(out))  # external data references are kept as they are
    return QuantizedPart(part, "int8", out, _data_files(out), tuple(include), tuple(kept),
                         {"scheme": "qdq", "weights": "int8 per-channel symmetric"
                                                      + (", 7-bit range (reduce_range)" if reduce_range else ""),
                          "activations": "int8 symmetric"
                                         + (", stored as uint8 + 128" if unsigned_activations else ""),
                          "calibration_method": method, "calibration_batches": len(reader),
                          "float_consumers_rewired": rewired})


def compare_calibration_methods(part: str, src: str | os.PathLike, reader, eval_feeds: Sequence[dict],
                                output: str, workdir: str | os.PathLike,
                                methods: Sequence[str] = CALIBRATION_METHODS) -> dict[str, float]:
    """max |int8 - fp32| / max |fp32| of ``output`` over ``eval_feeds`` for each calibration method."""
    ref = _session(src)
    refs = [ref.run([output], f)[0] for f in eval_feeds]
    scale = max(float(np.abs(r).max()) for r in refs)
    errs = {}
    for m in methods:
        q = quantize_int8_static(part, src, Path(workdir) / f"{part}.{m}.onnx", reader, method=m)
        s = _session(q.path)
        errs[m] = max(float(np.abs(s.run([output], f)[0] - r).max()) for f, r in zip(eval_feeds, refs)) / scale
        del s
    return errs


def _session(path):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


# ------------------------------------------------------------- weight-only INT4/8
def _algo_config(algorithm: str, bits: int, block: int, accuracy_level: int | None):
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    # gptq: onnxruntime's RTN node rewrite with our rounding swapped in (.gptq: why not GPTQWeightOnlyQuantConfig)
    if algorithm in ("rtn", "gptq"):
        return mnq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, accuracy_level=accuracy_level,
                                                bits=bits)
    if algorithm == "hqq":
        return mnq.HQQWeightOnlyQuantConfig(block_size=block, bits=bits)
    raise ConfigError(f"weight-only algorithm {algorithm!r}: choose one of {list(WEIGHT_ONLY_ALGORITHMS)}")


def quantize_weight_only(part: str, src: str | os.PathLike, out: str | os.PathLike, precision: str,
                         recipe: QuantRecipe | None = None, algorithm: str = "rtn", block_size: int = CPU_BLOCK,
                         accuracy_level: int | None = 4, reader=None) -> QuantizedPart:
    """Weight-only MatMulNBits of an fp32 ONNX part; the recipe may mix int4 and int8 per node."""
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer as mnq
    except ImportError as e:
        from ..core.errors import MissingDependencyError

        raise MissingDependencyError(f"weight-only quantization needs onnxruntime's quantizer ({e}); install it "
                                     "with `pip install 'vlmexport[quant]'`") from None

    src, out = Path(src), Path(out)
    nodes = _weight_nodes(onnx.load(str(src), load_external_data=False), ("MatMul",))
    chosen = recipe.select(part, nodes) if recipe is not None else {n: precision for n, _ in nodes}
    hessians = None
    if algorithm == "gptq" and "int4" in chosen.values():
        if reader is None:
            raise ValueError("gptq needs calibration data (a reader over the calibration pairs)")
        from .calib import input_hessians

        # a weight read by several MatMuls is written once (onnxruntime names it after the weight), so
        # it cannot hold each node's own GPTQ codes: such weights are rounded to nearest
        uses = Counter(w for _, w in nodes)
        shared = [n for n, w in nodes if uses[w] > 1 and chosen.get(n) == "int4"]
        if shared:
            log.warning("GPTQ: %d MatMuls share their weight with another (e.g. %s); rounded to nearest",
                        len(shared), shared[0])
        # before the weights are loaded here, so onnxruntime's session and this copy never coexist
        fitted = [n for n, q in chosen.items() if q == "int4" and n not in shared]
        hessians = input_hessians(src, reader, fitted) if fitted else {}
    model = onnx.load(str(src))  # with its external data
    done: list[str] = []
    errors: dict[str, tuple[float, float]] = {}  # gptq: node -> (rtn, gptq) relative output error
    for p in ("int4", "int8"):
        include = [n for n, q in chosen.items() if q == p]
        if not include:
            continue
        bits = int(p[3:])
        # int8 is always rtn: 8-bit rounding already loses nothing measurable (the int8 gate), the LM
        # head sees one calibration row per pair (too few for a Hessian), and hqq's 8-bit nodes (float
        # zero points) hit onnxruntime 1.31's unpacked CPU path ("Only 2b and 4b quantization is supported")
        algo = algorithm if bits == 4 else "rtn"
        # nodes_to_include only adds to op_types_to_quantize in onnxruntime: exclude the rest explicitly
        q = mnq.MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                     accuracy_level=accuracy_level,
                                     nodes_to_exclude=[n for n, _ in nodes if n not in include],
                                     algo_config=_algo_config(algo, bits, block_size, accuracy_level))
        if algo == "gptq":
            from .gptq import node_quantizer

            q.node_quantizer = node_quantizer(q.algo_config, hessians)
            hessians = None  # the quantizer drops each matrix once its nodes are done
        t0 = time.perf_counter()
        q.process()
        if algo == "gptq":
            errors.update(q.node_quantizer.errors)
            log.info("GPTQ: %d MatMuls of %s rounded in %.0f s", len(q.node_quantizer.errors), part,
                     time.perf_counter() - t0)
        model = q.model.model
        done += include
    if not done:
        raise ConfigError(f"{part}: the recipe quantizes none of its {len(nodes)} MatMul nodes")
    bad = _nonfinite_scales(model)
    if bad:
        cause = _nonfinite_cause(part, src, reader) if reader is not None and algorithm == "gptq" else None
        raise cause or DataError(f"{part}: {bad[0]} got a NaN/inf quantization scale: the fp32 weights of that node "
                                 "hold NaN/inf; check the checkpoint")
    _save(model, out, external=model_bytes(src) > EXTERNAL_DATA_ABOVE)
    kept = [n for n, q in chosen.items() if q is None]
    return QuantizedPart(part, precision, out, _data_files(out), tuple(done), tuple(kept),
                         {"scheme": "weight-only MatMulNBits",
                          "algorithm": algorithm if "int4" in chosen.values() else "rtn",  # 8-bit: always rtn
                          "block_size": block_size,
                          "accuracy_level": accuracy_level, "symmetric": True,
                          "nodes_per_precision": {p: sum(q == p for q in chosen.values()) for p in ("int4", "int8")
                                                  if p in chosen.values()},
                          "int8_nodes": sorted(n for n, q in chosen.items() if q == "int8" and precision != "int8"),
                          **({"output_error": _error_summary(errors)} if errors else {})})


def _error_summary(errors: dict[str, tuple[float, float]]) -> dict:
    """Mean relative MatMul output error on the calibration rows, RTN vs GPTQ, per expert."""
    from ..core.names import onnx_is_visual_expert as is_visual_expert

    out = {}
    for expert, keep in (("language", lambda n: not is_visual_expert(n)), ("vision", is_visual_expert)):
        e = np.array([v for n, v in errors.items() if keep(n)])
        if len(e):
            out[expert] = {"nodes": len(e), "rtn": round(float(e[:, 0].mean()), 6),
                           "gptq": round(float(e[:, 1].mean()), 6)}
    return out
