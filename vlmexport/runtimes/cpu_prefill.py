"""An int8-GEMM copy of a quantized decoder's prefill graph, derived on the device for x86 CPUs
without int8 dot-product instructions (VNNI).

On such a CPU onnxruntime's ``MatMulNBits`` computes a prefill's many-row products no faster than
its fp32 SGEMM (4 bits, accuracy level 4: 100-105 GFLOP/s against 116-120 on the 2-vCPU AVX2 EPYC;
8 bits: 62-71), while its int8 GEMM (MLAS QGEMM, under ``MatMulInteger``) reaches 171-178
(docs/results.md, ``benchmarks/cpu_decode_breakdown.py --only gemm``). So there the runtime runs
the prompt through a copy of the prefill graph whose ``MatMulNBits`` nodes (the decoder layers';
the LM head reads one row and stays) are ``MatMulIntegerToFloat`` on int8 weights:

- **weights**: the node's own codes, dequantized (``(code - zero point) * block scale``) and
  requantized per output column, symmetric, on 7 bits (|code| <= 63). Without VNNI the kernel
  multiplies uint8 by int8 pairs into int16 (``vpmaddubsw``), which saturates with 8-bit weights
  (255 * 127 * 2 > 32767); 7 bits cannot (docs/quantization.md, "INT8 on CPUs without VNNI").
- **activations**: quantized per row (per token) at run time, symmetric, ``round(x / s)`` with
  ``s = max|row| / 127``, stored as uint8 + 128 (the kernel's activation type).
- the int32 sums are scaled by the column's scale in the kernel, then by the row's.

The decode steps keep the bundle's own graph and weights (one row: ``MatMulNBits`` reads half the
bytes). The copy is written once per decoder file into the cache (``$VLMEXPORT_CACHE`` or
``~/.cache/vlmexport``, ``cpu-prefill/``), keyed by the graph's bytes and the data file's size and
mtime, under a file lock, and published atomically; a rebuilt decoder's copy replaces the old one.
Its numerics differ from the bundle's ``MatMulNBits`` (per-row rather than per-128-value
activation scales, a second rounding of the weights), so the build's gate scores it
(pipeline/quantize.py) and ``vlmexport.load`` uses it only where that passed;
``load(cpu_prefill="off")`` / ``vlmexport run --cpu-prefill off`` keep the bundle's graph.

numpy and onnx only (no onnxruntime): the graph is rewritten with onnx's helpers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from pathlib import Path

import numpy as np

from ..core.atomic import user_cache_dir
from ..core.errors import VlmexportError
from ..core.names import CpuPrefill
from .environment import cpu_flags

log = logging.getLogger(__name__)

FORMAT_VERSION = 4  # bump when the derived graph changes: old cache entries are then ignored
WEIGHT_MAX = 63  # 7-bit weight codes: no int16 saturation in the kernel without VNNI (module docstring)
ACTIVATION_MAX = 127
ACTIVATION_ZERO = 128  # symmetric int8 codes stored as uint8 + 128
SOURCE = "source.json"  # in each cache entry: the decoder graph it was derived from
CONVERTED_PREFIX = "layers."  # the decoder layers' projections (exporter/onnx_decoder.py names); the LM head stays
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def lacks_int8_dot(flags: set[str] | None = None, machine: str | None = None) -> bool:
    """True on an x86 CPU whose flags show no int8 dot-product instructions (VNNI, AMX): the
    CPUs where the int8-GEMM prefill is faster (module docstring). False elsewhere, and where
    the flags cannot be read."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i686", "i386"):
        return False
    flags = cpu_flags() if flags is None else flags
    return bool(flags) and "avx2" in flags and not any(f in flags for f in INT8_DOT_FLAGS)


def wanted(mode: "str | CpuPrefill | None") -> bool:
    """Whether ``mode`` asks for the int8-GEMM prefill on this machine."""
    m = CpuPrefill.of(mode)
    return m is CpuPrefill.INT8 or (m is CpuPrefill.AUTO and lacks_int8_dot())


def gate_record(decoder) -> dict:
    """The build's score of this copy for a bundle's decoder artifact (``extra.scores.cpu_prefill_int8``,
    pipeline/quantize.py), or {}."""
    return ((getattr(decoder, "extra", None) or {}).get("scores") or {}).get("cpu_prefill_int8") or {}


def gate_passed(decoder) -> bool:
    """Whether the build scored this version's copy (:data:`FORMAT_VERSION`) and it passed the gate."""
    r = gate_record(decoder)
    return r.get("passed") is True and r.get("format_version") == FORMAT_VERSION


# ------------------------------------------------------------------ the weights

def dequantize_nbits(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int, n: int,
                     bits: int, block: int) -> np.ndarray:
    """A ``MatMulNBits`` weight as fp32 ``[N, K]``: ``(code - zero point) * scale`` per block.

    ``codes``: uint8 ``[N, blocks, block * bits / 8]``, low nibble first at 4 bits; ``scales``:
    ``[N * blocks]``; ``zero_points``: uint8, packed like the codes (default ``2 ** (bits - 1)``), or
    float, one per block (onnxruntime's hqq quantizer)."""
    if bits not in (4, 8):
        raise ValueError(f"MatMulNBits with {bits} bits: only 4 and 8 are read")
    blocks = -(-k // block)
    raw = codes.reshape(n, blocks, -1)
    if bits == 4:
        q = np.empty((n, blocks, raw.shape[-1] * 2), np.uint8)
        q[..., 0::2], q[..., 1::2] = raw & 0x0F, raw >> 4
    else:
        q = raw
    if zero_points is None:
        zp = np.full((n, blocks, 1), 1 << (bits - 1), np.float32)
    elif np.issubdtype(zero_points.dtype, np.floating):  # hqq's: one float per block, not packed
        zp = zero_points.reshape(n, blocks, 1).astype(np.float32)
    else:
        zp = zero_points.reshape(n, -1)
        if bits == 4:
            zp = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)
        zp = zp[:, :blocks, None].astype(np.float32)
    w = q.astype(np.float32)  # in place from here: one float32 copy of the matrix at a time
    w -= zp
    w *= scales.reshape(n, blocks, 1).astype(np.float32, copy=False)
    return w.reshape(n, -1)[:, :k]


def per_column_int8(w_nk: np.ndarray, qmax: int = WEIGHT_MAX) -> tuple[np.ndarray, np.ndarray]:
    """``[N, K]`` fp32 -> (int8 ``[K, N]`` codes in ``[-qmax, qmax]``, fp32 ``[N]`` scales), symmetric
    per output column (``w ~= codes * scale``)."""
    amax = np.abs(w_nk).max(axis=1)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    q = w_nk / scale[:, None]  # then in place: one float32 copy of the matrix at a time
    np.rint(q, out=q)
    np.clip(q, -qmax, qmax, out=q)
    return np.ascontiguousarray(q.astype(np.int8).T), scale


# ------------------------------------------------------------------ the graph

def _converted(node, inits) -> bool:
    """Whether the rewrite converts ``node``: a decoder layer's ``MatMulNBits`` whose weights,
    scales, zero points and bias are initializers, without ``g_idx``."""
    ins = list(node.input) + [""] * (6 - len(node.input))
    b, s, zp, g_idx, bias = ins[1:6]
    return (node.op_type == "MatMulNBits" and node.domain == "com.microsoft" and node.name.startswith(CONVERTED_PREFIX)
            and b in inits and s in inits and (not zp or zp in inits) and not g_idx and (not bias or bias in inits))


def _replaced(nodes, inits) -> set[str]:
    """The converted nodes' weights, scales and zero points that no other node reads: the copy drops them."""
    readers: dict[str, int] = {}
    converted: dict[str, int] = {}
    for node in nodes:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
        if _converted(node, inits):
            for name in list(node.input)[1:4]:
                if name:
                    converted[name] = converted.get(name, 0) + 1
    return {name for name, n in converted.items() if readers[name] == n}


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def int8_prefill_model(model, read=None, make=None) -> int:
    """Rewrite ``model`` (an onnx ModelProto) in place: each converted ``MatMulNBits`` (module
    docstring) becomes onnxruntime's ``MatMulIntegerToFloat`` on int8 weights (scaled per column
    inside the kernel) and per-row uint8 activations (a ``QuantizeLinear`` per row, shared by the
    products that read the same rows), then a ``Mul`` by the row scales. Returns the number of
    nodes converted. ``read(tensor) -> array`` reads an initializer (default: from the loaded
    model); ``make(array, name) -> TensorProto`` makes a new one (default: inline), so
    :func:`write_int8_prefill` streams the weights from file to file.

    One scale per activation matrix instead (onnxruntime's ``DynamicQuantizeMatMul``, one node)
    was 6% faster on bench-s (prefill 620 against 633 ms, int4's graph 995 ms; 2-vCPU AVX2 EPYC,
    interleaved), but one outlying row would then coarsen every row's codes."""
    from onnx import helper, numpy_helper

    read = read or numpy_helper.to_array
    make = make or (lambda array, name: numpy_helper.from_array(array, name))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    dropped = _replaced(g.node, inits)
    opset = _opset(model)
    new_nodes, added, quantized = [], [], {}
    converted = 0

    def const(name, array):
        added.append(make(np.asarray(array), name))
        return name

    for node in g.node:
        ins = list(node.input) + [""] * (6 - len(node.input))
        a, b, s, zp, _, bias = ins[:6]
        if not _converted(node, inits):
            new_nodes.append(node)
            continue
        at = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        w = dequantize_nbits(read(inits[b]), read(inits[s]), read(inits[zp]) if zp else None, at["K"], at["N"],
                             at.get("bits", 4), at["block_size"])
        codes, col_scale = per_column_int8(w)
        base = node.name
        wq, ws = const(f"{base}.weight_i8", codes), const(f"{base}.weight_i8_scale", col_scale)
        out = node.output[0]
        if a not in quantized:  # once per activation (q, k, v and gate, up read the same rows)
            p = f"{a}/i8"
            axes = [const(f"{p}.axes", np.array([1], np.int64))] if opset >= 18 else []
            new_nodes += [  # as [rows, K], whatever the activation's rank: one scale per row
                helper.make_node("Reshape", [a, const(f"{p}.2d", np.array([-1, at["K"]], np.int64))],
                                 [f"{p}.x"], name=f"{p}.Reshape"),
                helper.make_node("Shape", [a], [f"{p}.lead"], name=f"{p}.Shape", end=-1),
                helper.make_node("Abs", [f"{p}.x"], [f"{p}.abs"], name=f"{p}.Abs"),
                helper.make_node("ReduceMax", [f"{p}.abs", *axes], [f"{p}.amax"], name=f"{p}.ReduceMax",
                                 keepdims=0, **({"axes": [1]} if opset < 18 else {})),
                helper.make_node("Mul", [f"{p}.amax", const(f"{p}.inv", np.float32(1 / ACTIVATION_MAX))],
                                 [f"{p}.scale0"], name=f"{p}.Mul"),
                helper.make_node("Max", [f"{p}.scale0", const(f"{p}.tiny", np.float32(1e-30))],
                                 [f"{p}.scale"], name=f"{p}.Max"),
                helper.make_node("Shape", [f"{p}.scale"], [f"{p}.rows"], name=f"{p}.ShapeRows"),
                helper.make_node("Expand", [const(f"{p}.zero", np.uint8(ACTIVATION_ZERO)), f"{p}.rows"],
                                 [f"{p}.zp"], name=f"{p}.Expand"),
                helper.make_node("QuantizeLinear", [f"{p}.x", f"{p}.scale", f"{p}.zp"], [f"{p}.codes"],
                                 name=f"{p}.QuantizeLinear", axis=0),
                helper.make_node("Unsqueeze", [f"{p}.scale", const(f"{p}.col", np.array([1], np.int64))],
                                 [f"{p}.row_scale"], name=f"{p}.Unsqueeze"),
            ]
            quantized[a] = (f"{p}.codes", f"{p}.row_scale", const(f"{p}.zp0", np.uint8(ACTIVATION_ZERO)),
                            const(f"{p}.one", np.float32(1.0)), f"{p}.lead")
        codes_a, scale_a, zp_a, one, lead = quantized[a]
        y = [f"{base}_i8/{x}" for x in ("col", "row", "shape", "out")]
        new_nodes += [
            helper.make_node("MatMulIntegerToFloat", [codes_a, wq, one, ws, zp_a], [y[0]],
                             name=f"{base}_i8.MatMulIntegerToFloat", domain="com.microsoft"),
            helper.make_node("Mul", [y[0], scale_a], [y[1]], name=f"{base}_i8.MulRow"),
            helper.make_node("Concat", [lead, const(f"{base}_i8.n", np.array([at["N"]], np.int64))], [y[2]],
                             name=f"{base}_i8.Concat", axis=0),
            helper.make_node("Reshape", [y[1], y[2]], [out if not bias else y[3]], name=f"{base}_i8.Reshape",
                             allowzero=1),  # a 0 in the shape is an empty dimension, not "copy the input's"
        ]
        if bias:
            new_nodes.append(helper.make_node("Add", [y[3], bias], [out], name=f"{base}_i8.Bias"))
        converted += 1
    kept = [t for t in g.initializer if t.name not in dropped]
    del g.node[:]
    g.node.extend(new_nodes)
    del g.initializer[:]
    g.initializer.extend(kept + added)
    return converted


def external_files(graph_path: Path) -> list[Path]:
    """The external data files a graph file reads (its initializers' ``location`` entries)."""
    names = {e.value for t in _graph(graph_path).graph.initializer for e in t.external_data if e.key == "location"}
    return sorted(graph_path.parent / n for n in names)


def cache_key(graph_path: str | os.PathLike, identity: str | None = None) -> str:
    """The graph file's bytes and either ``identity`` (the bundle manifest's sha256 of the decoder's
    files, which the loader passes) or its data files' names, sizes and mtimes; the format version."""
    graph_path = Path(graph_path)
    h = hashlib.sha256(graph_path.read_bytes())
    facts = identity
    if facts is None:
        facts = []
        for p in external_files(graph_path):
            try:
                facts.append((p.name, p.stat().st_size, p.stat().st_mtime_ns))
            except OSError:
                raise VlmexportError(f"{p}: missing; rebuild the bundle with `vlmexport build`") from None
    h.update(json.dumps({"files": facts, "version": FORMAT_VERSION}).encode())
    return h.hexdigest()[:20]


def cache_root() -> Path:
    return user_cache_dir("cpu-prefill")


def _graph(graph_path: str | os.PathLike):
    """The graph file's proto, its weights not read."""
    import onnx

    return onnx.load(str(graph_path), load_external_data=False)


def convertible(graph_path: str | os.PathLike) -> bool:
    """Whether the graph has a ``MatMulNBits`` node the rewrite converts (its weights not read)."""
    return _copy_sizes(_graph(graph_path))[0] > 0


def _tensor_bytes(t) -> int:
    """An initializer's bytes, read from its proto alone (external data's length, or its fields)."""
    from onnx import helper, numpy_helper

    info = {e.key: e.value for e in t.external_data}
    if "length" in info:
        return int(info["length"])
    if info:  # external without a length: the rest of its file is not known here; count from the shape
        return int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return numpy_helper.to_array(t).nbytes


def _weight_bytes(model) -> int:
    """The bytes of a graph's initializers (what a session of it reads)."""
    return sum(_tensor_bytes(t) for t in model.graph.initializer)


def _copy_sizes(model) -> tuple[int, int]:
    """(nodes the rewrite converts, bytes of weights the copy holds) of a graph proto: int8 ``K x N``
    codes and ``N`` scales per converted ``MatMulNBits``, the other initializers as they are (a
    weight another node also reads is kept)."""
    from onnx import helper

    inits = {t.name: t for t in model.graph.initializer}
    converted = total = 0
    for n in model.graph.node:
        if _converted(n, inits):
            at = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            total += at["K"] * at["N"] + 4 * at["N"]
            converted += 1
    replaced = _replaced(model.graph.node, inits)
    return converted, total + sum(_tensor_bytes(t) for t in model.graph.initializer if t.name not in replaced)


def copy_bytes(graph_path: str | os.PathLike) -> int:
    """The bytes of weights the copy of ``graph_path`` holds, from the graph alone (:func:`_copy_sizes`)."""
    return _copy_sizes(_graph(graph_path))[1]


def check_fits(graph_path: str | os.PathLike, available: int | None,
               decode_path: str | os.PathLike | None = None) -> None:
    """One VlmexportError line when ``available`` bytes of memory (``MemAvailable``; None: unknown,
    no check) cannot hold the copy beside the weights of the graph that runs the decode steps:
    ``decode_path``'s, or without one the bundle's decoder graph's. "auto" then keeps the
    bundle's graph."""
    if available is None:
        return
    model = _graph(graph_path)
    converted, copy = _copy_sizes(model)
    if not converted:  # no copy to make: nothing to check
        return
    need = copy + _weight_bytes(_graph(decode_path) if decode_path else model)
    if need > available:
        raise VlmexportError(f"the int8 prefill copy of {Path(graph_path).name} and the decode graph need "
                             f"{need / 2**30:.1f} GiB of memory; {available / 2**30:.1f} GiB is available; free "
                             "memory, or pass cpu_prefill='int8' (--cpu-prefill int8) to use it anyway")


LOUD_COPY_BYTES = 2**30  # a copy this large is announced as a warning (the CLI's default level shows it)
KEEP_PER_SOURCE = 2  # copies kept per decoder path: a rebuilt bundle's and the one before (or two bundles there)


def _prune(entry: Path) -> None:
    """Remove the least recently used copies derived from ``entry``'s source path beyond
    :data:`KEEP_PER_SOURCE` (a rebuilt bundle's decoder gets a new copy), with their lock files; a
    copy whose lock another process holds is left. A process still reading a removed copy keeps
    reading it (POSIX); one about to open it falls back to the bundle's graph (``cpu_prefill="auto"``)."""
    import shutil

    from filelock import FileLock, Timeout

    source = json.loads((entry / SOURCE).read_text())["source"]
    same = []
    for other in entry.parent.glob(f"{entry.name.rsplit('-', 1)[0]}-*"):
        try:
            if json.loads((other / SOURCE).read_text())["source"] == source:
                same.append(((other / SOURCE).stat().st_mtime_ns, other))
        except (OSError, ValueError, KeyError):
            continue
    for _, other in sorted(same, reverse=True)[KEEP_PER_SOURCE:]:
        if other == entry:
            continue
        lock_path = entry.parent / f".{other.name}.lock"
        try:
            with FileLock(lock_path, timeout=0):
                shutil.rmtree(other, ignore_errors=True)
            lock_path.unlink(missing_ok=True)
        except (Timeout, OSError):
            continue


def _touch(entry: Path) -> None:
    """Mark ``entry`` used (its source record's mtime orders :func:`_prune`); a read-only cache is fine."""
    try:
        os.utime(entry / SOURCE)
    except OSError:
        pass


INLINE_BYTES = 1024  # smaller tensors stay in the graph file (onnx.save_model's size_threshold)
_ALIGN = 64


class _CacheWriteError(OSError):
    """Writing the copy failed (the cache's disk, not the source): reported as "cannot write there"."""


class _DataFile:
    """One external data file written as its tensors are made, so a derivation never holds more than
    one weight matrix: ``tensor`` appends a new array, ``copy`` streams a kept initializer's bytes
    over from the source's data file (read in chunks)."""

    def __init__(self, path: Path):
        self.path, self.location = path, path.name
        try:
            self.f = open(path, "wb")
        except OSError as exc:
            raise _CacheWriteError(str(exc)) from None

    def __enter__(self):
        return self

    def __exit__(self, kind, *exc) -> None:
        """Flush and sync to the disk (the entry must not look complete after a crash with its data
        still in the page cache), and close, whatever fails; a failure there is the cache's too,
        unless an error is already on its way."""
        err = None
        try:
            if kind is None:
                self.f.flush()
                os.fsync(self.f.fileno())
        except OSError as e:
            err = e
        finally:
            try:
                self.f.close()
            except OSError as e:
                err = err or e
        if err is not None and kind is None:
            raise _CacheWriteError(f"{self.path}: {err.strerror or err}")

    def write(self, data: bytes) -> None:
        try:
            self.f.write(data)
        except OSError as exc:
            raise _CacheWriteError(f"{self.path}: {exc.strerror or exc}") from None

    def _external(self, t, length: int) -> None:
        """Point ``t`` at the next ``length`` bytes of this file (written next by the caller)."""
        from onnx import TensorProto

        self.write(b"\0" * (-self.f.tell() % _ALIGN))
        t.ClearField("raw_data")  # else onnx.save_model writes the proto's bytes over the data file
        del t.external_data[:]
        for key, value in (("location", self.location), ("offset", str(self.f.tell())), ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        t.data_location = TensorProto.EXTERNAL

    def tensor(self, array: np.ndarray, name: str):
        from onnx import numpy_helper

        array = np.asarray(array)
        if array.nbytes < INLINE_BYTES:
            return numpy_helper.from_array(array, name)  # a 0-d scalar stays 0-d
        array = np.ascontiguousarray(array)
        t = numpy_helper.from_array(array.reshape(-1)[:0], name)  # its type; the bytes go to the file
        del t.dims[:]
        t.dims.extend(array.shape)
        self._external(t, array.nbytes)
        self.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
        return t

    def copy(self, t, source_dir: Path, chunk: int = 1 << 24) -> None:
        info = {e.key: e.value for e in t.external_data}
        src = source_dir / info["location"]
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else src.stat().st_size - offset
        self._external(t, length)
        with open(src, "rb") as f:
            f.seek(offset)
            left = length
            while left:
                block = f.read(min(chunk, left))
                if not block:
                    raise ValueError(f"{src}: ends before tensor {t.name}'s {length} bytes at offset {offset}")
                self.write(block)
                left -= len(block)


def _read_external(source_dir: Path):
    """``read`` for :func:`int8_prefill_model`: one initializer's array, loaded from the source's data
    file into a copy of its proto (the model's own proto keeps no bytes)."""
    from onnx import TensorProto, numpy_helper

    def read(t):
        c = TensorProto()
        c.CopyFrom(t)
        return numpy_helper.to_array(c, str(source_dir))

    return read


def _only_initializers_external(model) -> None:
    """A decoder graph whose external data sits anywhere but its main graph's initializers (a
    ``Constant``'s tensor, a subgraph, a sparse initializer) is not what this rewrite copies over."""
    from onnx import AttributeProto

    g = model.graph
    if len(g.sparse_initializer):
        raise ValueError("sparse initializers are not copied")
    for node in g.node:
        for a in node.attribute:
            if a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
                raise ValueError(f"node {node.name!r} has a subgraph, which this rewrite does not copy")
            tensors = [a.t] if a.type == AttributeProto.TENSOR else list(a.tensors)
            if any(len(x.external_data) for x in tensors):
                raise ValueError(f"node {node.name!r} keeps a tensor in external data, which is not copied")


def write_int8_prefill(graph_path: Path, out_dir: Path):
    """Write the rewritten graph of ``graph_path`` into ``out_dir`` (its file name, weights in
    ``<name>.data``), streaming: memory holds the graph and one weight matrix at a time, not the
    model. One VlmexportError line naming the file it could not read or convert."""
    import onnx

    try:
        model = _graph(graph_path)
        _only_initializers_external(model)
        with _DataFile(out_dir / f"{graph_path.name}.data") as data:
            made: set[str] = set()

            def make(array, name):
                made.add(name)
                return data.tensor(array, name)

            int8_prefill_model(model, read=_read_external(graph_path.parent), make=make)
            for t in model.graph.initializer:  # the kept ones (LM head, norms, rotary tables): copied over
                if t.name not in made and t.data_location == onnx.TensorProto.EXTERNAL:
                    data.copy(t, graph_path.parent)
        try:
            with open(out_dir / graph_path.name, "wb") as f:  # the graph alone: every weight is in the data file
                f.write(model.SerializeToString())
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise _CacheWriteError(str(exc)) from None
    except _CacheWriteError:
        raise  # int8_prefill_path: "cannot write the int8 prefill graph there"
    except Exception as exc:  # unreadable, truncated or unexpected: the caller says what to do
        raise VlmexportError(f"{graph_path}: cannot derive its int8 prefill graph ({str(exc).splitlines()[0][:160]}); "
                             "check the bundle (`vlmexport inspect`) or pass cpu_prefill='off'") from None


def int8_prefill_path(graph_path: str | os.PathLike, root: str | os.PathLike | None = None,
                      identity: str | None = None) -> Path | None:
    """The int8-GEMM copy of ``graph_path`` (written on first use, under a lock, published
    atomically), or None when the graph has no ``MatMulNBits`` to convert (an fp32 decoder).
    ``identity``: see :func:`cache_key`."""
    from filelock import FileLock

    from ..core.atomic import AtomicWriteError, atomic_directory

    graph_path = Path(graph_path)
    if not convertible(graph_path):
        return None
    entry = Path(root or cache_root()) / f"{graph_path.stem}-{cache_key(graph_path, identity)}"
    out = entry / graph_path.name
    if out.is_file():
        _touch(entry)
        return out
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(entry.parent / f".{entry.name}.lock"):
            if not out.is_file():  # another process may have written it while this one waited
                size = copy_bytes(graph_path)  # a large one takes minutes: say so where the CLI shows it
                log.log(logging.WARNING if size >= LOUD_COPY_BYTES else logging.INFO,
                        "writing the int8-GEMM prefill copy of %s (%.1f GB, once per decoder file) into %s",
                        graph_path, size / 1e9, entry)
                with atomic_directory(entry) as tmp:
                    write_int8_prefill(graph_path, Path(tmp))
                    (tmp / SOURCE).write_text(json.dumps({"source": str(graph_path.resolve())}) + "\n")
                _prune(entry)
    except (OSError, AtomicWriteError) as exc:
        raise VlmexportError(f"{entry}: cannot write the int8 prefill graph there ({exc}); set VLMEXPORT_CACHE to "
                             "a writable directory or pass cpu_prefill='off'") from None
    return out
