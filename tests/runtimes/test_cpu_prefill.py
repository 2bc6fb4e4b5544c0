"""runtimes/cpu_prefill.py: the int8-GEMM copy of a quantized decoder's prefill graph.

- the weights it reads are the MatMulNBits node's own (dequantized exactly as onnxruntime does);
- the rewritten graph computes its stated arithmetic (per-row int8 activations, per-column 7-bit
  weights) on any x86 kernel, 2-D and 3-D activations alike, with a bias; the LM head stays;
- the cache: written once, a new entry when the decoder file changes (the old one pruned), nothing
  for a graph without MatMulNBits, one clear line when the cache cannot be written;
- which CPUs get it, and the modes' names.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_ir")  # onnxruntime's MatMulNBits quantizer needs it

from vlmexport.core.errors import VlmexportError  # noqa: E402
from vlmexport.core.names import CpuPrefill  # noqa: E402
from vlmexport.quant.quantize import quantize_weight_only  # noqa: E402
from vlmexport.runtimes import cpu_prefill as cp  # noqa: E402

K, N = 256, 96


def _graph(tmp_path, names=("layers.0.proj", "lm_head"), rank=3, bias=False, k=K, opset=17):
    """fp32 MatMuls named ``names`` in a chain (the first k x K, then K x K, the last to N), then MatMulNBits'd."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i, name in enumerate(names):
        n = N if i == len(names) - 1 else K
        w = (rng.standard_normal((k if i == 0 else K, n)) * 0.05).astype(np.float32)
        w[:, 0] = 0.05  # an equal-magnitude column: every code at its range's end
        inits.append(numpy_helper.from_array(w, f"{name}.weight"))
        nodes.append(helper.make_node("MatMul", [x, f"{name}.weight"], [f"{name}/out"], name=name))
        x = f"{name}/out"
        if bias and i == 0:
            inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), f"{name}.bias"))
            nodes.append(helper.make_node("Add", [x, f"{name}.bias"], [f"{name}/biased"], name=f"{name}.add"))
            x = f"{name}/biased"
    shape = ["b", "m", k][-rank:]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [*shape[:-1], N])], inits)
    src = tmp_path / "f.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]), str(src))
    return src


def _quantized(tmp_path, precision="int4", algorithm="rtn", **kw):
    out = tmp_path / "q" / "text_decoder.onnx"
    out.parent.mkdir(exist_ok=True)
    return quantize_weight_only("text_decoder", _graph(tmp_path, **kw), out, precision, algorithm=algorithm,
                                block_size=128, accuracy_level=4).path


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("precision,algorithm,k", [("int4", "rtn", K), ("int8", "rtn", K), ("int4", "hqq", K),
                                                   ("int4", "rtn", 200)])
def test_weights_are_the_nodes_own(tmp_path, precision, algorithm, k):
    """dequantize_nbits gives the weights onnxruntime's MatMulNBits multiplies by (level 1: fp32
    compute on the dequantized weights, read back through an identity input): 4 and 8 bits, hqq's
    float zero points, and a K that is not a multiple of the block (padded codes)."""
    src = _quantized(tmp_path, precision, algorithm, names=("layers.0.proj",), rank=2, k=k)
    m = onnx.load(str(src))
    node = next(n for n in m.graph.node if n.op_type == "MatMulNBits")
    for a in node.attribute:
        if a.name == "accuracy_level":
            a.i = 1
    onnx.save(m, str(tmp_path / "level1.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    at = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    zp = inits[node.input[3]] if len(node.input) > 3 and node.input[3] else None
    assert (zp is not None) == (algorithm == "hqq")
    w = cp.dequantize_nbits(inits[node.input[1]], inits[node.input[2]], zp, at["K"], at["N"], at["bits"],
                            at["block_size"])
    ort_w = _run(tmp_path / "level1.onnx", np.eye(k, dtype=np.float32))  # [k, N]
    assert np.allclose(w.T, ort_w, rtol=0, atol=1e-6 * np.abs(ort_w).max())


@pytest.mark.parametrize("rank,bias,opset", [(3, False, 17), (2, True, 17), (3, False, 18)])
def test_rewritten_graph_computes_its_arithmetic(tmp_path, rank, bias, opset):
    """Per-row activations on int8 (round(x / s), s = max|row| / 127) times per-column 7-bit weights:
    what the graph computes, also with same-sign inputs, where 8-bit weights would saturate a 16-bit
    kernel without VNNI, with zero rows (a text-only prompt's visual-expert rows) and a batch of two.
    The LM head stays. Opset 18 takes ReduceMax's axes as an input."""
    src = _quantized(tmp_path, names=("layers.0.proj", "lm_head"), rank=rank, bias=bias, opset=opset)
    m = onnx.load(str(src))
    assert cp.int8_prefill_model(m) == 1
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("MatMulNBits") == 1 and ops.count("MatMulIntegerToFloat") == 1  # the LM head stays
    onnx.save(m, str(tmp_path / "i8.onnx"))

    q = onnx.load(str(src))
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    node = next(n for n in q.graph.node if n.name.startswith("layers."))
    at = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    codes, col = cp.per_column_int8(cp.dequantize_nbits(inits[node.input[1]], inits[node.input[2]], None,
                                                        at["K"], at["N"], 4, at["block_size"]))
    assert np.abs(codes).max() == cp.WEIGHT_MAX
    w8 = codes.astype(np.float64) * col.astype(np.float64)
    head = next(n for n in q.graph.node if n.name.startswith("lm_head"))
    lm = onnx.helper.make_model(helper.make_graph(
        [head], "h", [helper.make_tensor_value_info(head.input[0], TensorProto.FLOAT, ["r", K])],
        [helper.make_tensor_value_info(head.output[0], TensorProto.FLOAT, ["r", N])],
        [q.graph.initializer[i] for i, t in enumerate(q.graph.initializer) if t.name in head.input]),
        opset_imports=list(q.opset_import))
    lm_sess = ort.InferenceSession(lm.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for x in (rng.standard_normal((6, K)), np.abs(rng.standard_normal((6, K))) * 3, np.full((2, K), 2.0),
              np.zeros((0, K))):
        x = x.astype(np.float32)
        s = np.abs(x).max(-1, keepdims=True) / 127
        h = (np.round(x / s) * s).astype(np.float64) @ w8
        if bias:
            h = h + inits["layers.0.proj.bias"]
        want = lm_sess.run(None, {head.input[0]: h.astype(np.float32)})[0]
        feed = x.reshape(2 if len(x) % 2 == 0 else 1, -1, K) if rank == 3 else x  # 3-D: two sequences
        got = _run(tmp_path / "i8.onnx", feed)
        assert got.shape == (*feed.shape[:-1], N)
        assert np.abs(got.reshape(want.shape) - want).max(initial=0) <= 1e-5 * np.abs(want).max(initial=0)


def _external(src, tmp_path, name="ext"):
    """``src`` saved again with every tensor of 1 KiB or more in one external data file, as a bundle's."""
    return _external_model(onnx.load(str(src)), tmp_path, name)


def _external_model(m, tmp_path, name):
    g = tmp_path / name / "text_decoder.onnx"
    g.parent.mkdir()
    onnx.save_model(m, str(g), save_as_external_data=True, location="text_decoder.onnx.data", size_threshold=1024)
    return g


@pytest.mark.parametrize("precision,algorithm", [("int4", "rtn"), ("int8", "rtn"), ("int4", "hqq")])
def test_streamed_copy_equals_the_rewrite_in_memory(tmp_path, precision, algorithm):
    """write_int8_prefill (weights read and written one tensor at a time) writes exactly what
    int8_prefill_model makes of the loaded model: nodes, initializer names, types, shapes (0-d
    scalars stay 0-d) and values, the kept LM head included; 4 and 8 bits, hqq's float zero points."""
    src = _external(_quantized(tmp_path, precision, algorithm, names=("layers.0.proj", "layers.1.proj", "lm_head"),
                               bias=True), tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    cp.write_int8_prefill(src, out)
    assert sorted(f.name for f in out.iterdir()) == ["text_decoder.onnx", "text_decoder.onnx.data"]
    want = onnx.load(str(src))
    assert cp.int8_prefill_model(want) == 2
    got = onnx.load(str(out / src.name))
    assert [n.SerializeToString() for n in got.graph.node] == [n.SerializeToString() for n in want.graph.node]
    assert [i.name for i in got.graph.initializer] == [i.name for i in want.graph.initializer]
    for a, b in zip(got.graph.initializer, want.graph.initializer):
        x, y = numpy_helper.to_array(a), numpy_helper.to_array(b)
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), a.name
    x = np.random.default_rng(0).standard_normal((1, 5, K)).astype(np.float32)
    np.testing.assert_array_equal(_run(out / src.name, x), _run(cp.int8_prefill_path(src, tmp_path / "c"), x))


DERIVE_CHILD = """
import sys
from pathlib import Path
import onnx
from vlmexport.runtimes import cpu_prefill as cp

def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))

try:
    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from here: imports left out
except OSError:
    print("refused")
    sys.exit(0)
base = status("VmRSS")
cp.write_int8_prefill(Path(sys.argv[1]), Path(sys.argv[2]))
print(base, status("VmHWM"))
"""


def test_derivation_holds_one_weight_matrix_not_the_model(tmp_path):
    """A copy of 48 MB of int8 weights (48 projections of 1024 x 1024, int4 codes in the source) is
    derived in a process whose peak resident memory grows by less than half of that: the weights
    stream from file to file one matrix at a time (loading the model whole took 2.7x the copy)."""
    import subprocess
    import sys

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident size")
    k = n = 1024
    block, rng = 128, np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(48):
        name = f"layers.{i}.proj"
        inits += [numpy_helper.from_array(rng.integers(0, 256, (n, k // block, block // 2), dtype=np.uint8), f"{name}.q"),
                  numpy_helper.from_array((rng.random(n * k // block) * 0.01).astype(np.float32), f"{name}.s")]
        nodes.append(helper.make_node("MatMulNBits", [x, f"{name}.q", f"{name}.s"], [f"{name}/out"], name=name,
                                      domain="com.microsoft", K=k, N=n, bits=4, block_size=block))
        x = f"{name}/out"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["m", n])], inits)
    src = tmp_path / "src" / "text_decoder.onnx"
    src.parent.mkdir()
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(
        "com.microsoft", 1)]), str(src), save_as_external_data=True, location="text_decoder.onnx.data")
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run([sys.executable, "-c", DERIVE_CHILD, str(src), str(out)], capture_output=True, text=True,
                       check=True)
    if r.stdout.strip() == "refused":
        pytest.skip("this sandbox refuses /proc/self/clear_refs (resetting the peak resident size)")
    base_kb, peak_kb = map(int, r.stdout.split())
    data = (out / "text_decoder.onnx.data").stat().st_size
    assert data >= 48 * k * n
    assert (peak_kb - base_kb) * 1024 < data / 2, (peak_kb - base_kb, data // 1024)


def test_cache_written_once_renewed_with_the_file_and_pruned(tmp_path):
    src = _quantized(tmp_path, names=("layers.0.proj", "layers.1.proj", "lm_head"))
    root = tmp_path / "cache"
    p = cp.int8_prefill_path(src, root)
    assert p is not None and p.name == src.name and p.parent.parent == root
    first = p.stat().st_mtime_ns
    assert cp.int8_prefill_path(src, root) == p and p.stat().st_mtime_ns == first  # read, not rewritten
    x = np.random.default_rng(0).standard_normal((1, 7, K)).astype(np.float32)
    a, b = _run(src, x), _run(p, x)
    assert np.abs(a - b).max() <= 0.05 * np.abs(a).max()  # int4 level 4 and the int8 copy: near, not equal
    entries = [p.parent]
    for n in range(2):  # the bundle rebuilt twice: the decoder's file changes
        m = onnx.load(str(src))
        m.doc_string = f"rebuilt {n}"
        onnx.save(m, str(src))
        entries.append(cp.int8_prefill_path(src, root).parent)
    assert len(set(entries)) == 3 and all((e / src.name).is_file() for e in entries[1:])
    assert not entries[0].exists() and not (root / f".{entries[0].name}.lock").exists()  # the oldest pruned
    assert sorted(d.name for d in root.iterdir() if not d.name.startswith(".")) == sorted(e.name for e in entries[1:])
    assert cp.int8_prefill_path(src, root) == entries[2] / src.name


def test_a_missing_data_file_is_one_line(tmp_path):
    m = onnx.load(str(_quantized(tmp_path)))
    g = tmp_path / "ext" / "d.onnx"
    g.parent.mkdir()
    onnx.save_model(m, str(g), save_as_external_data=True, location="d.onnx.data", size_threshold=0)
    (g.parent / "d.onnx.data").unlink()
    with pytest.raises(VlmexportError, match="d.onnx.data: missing; rebuild the bundle"):
        cp.int8_prefill_path(g, tmp_path / "cache")
    with pytest.raises(VlmexportError, match="d.onnx: cannot derive its int8 prefill graph"):
        cp.int8_prefill_path(g, tmp_path / "cache", identity="the manifest's hashes")


def test_nothing_for_an_fp32_graph_and_one_line_for_an_unwritable_cache(tmp_path):
    src = _graph(tmp_path)
    assert cp.int8_prefill_path(src, tmp_path / "cache") is None
    assert not (tmp_path / "cache").exists()
    q = _quantized(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(VlmexportError, match="cannot write the int8 prefill graph there.*VLMEXPORT_CACHE"):
        cp.int8_prefill_path(q, blocker / "cache")


def test_a_full_disk_mid_write_is_one_line_and_leaves_no_entry(tmp_path, monkeypatch):
    """The cache's disk filling up while the copy's weights are written: the cache's message (not
    one blaming the bundle), and no entry, complete-looking or partial, left behind."""
    import errno

    q = _quantized(tmp_path, names=("layers.0.proj", "layers.1.proj", "lm_head"))
    real = cp._DataFile.write
    calls = []

    class Full:  # the data file's handle once the disk is full
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    def fill_up(self, data):
        calls.append(len(data))
        if len(calls) == 3:
            self.f = Full(self.f)
        real(self, data)

    monkeypatch.setattr(cp._DataFile, "write", fill_up)
    root = tmp_path / "cache"
    with pytest.raises(VlmexportError, match="cannot write the int8 prefill graph there.*No space left"):
        cp.int8_prefill_path(q, root)
    assert not [d for d in root.iterdir() if not d.name.startswith(".")]
    monkeypatch.setattr(cp._DataFile, "write", real)

    closed = []

    class LastFlushFails(Full):  # every write buffered; the disk fills when the buffer goes out at the end
        def write(self, data):
            return self.f.write(data)

        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            closed.append(True)
            self.f.close()

    real_enter = cp._DataFile.__enter__
    monkeypatch.setattr(cp._DataFile, "__enter__",
                        lambda self: (setattr(self, "f", LastFlushFails(self.f)), real_enter(self))[1])
    with pytest.raises(VlmexportError, match="cannot write the int8 prefill graph there.*No space left"):
        cp.int8_prefill_path(q, root)
    assert closed and not [d for d in root.iterdir() if not d.name.startswith(".")]
    monkeypatch.setattr(cp._DataFile, "__enter__", real_enter)
    assert cp.int8_prefill_path(q, root).is_file()  # the next load writes it whole


def test_external_data_outside_the_initializers_is_refused_in_one_line(tmp_path):
    """A tensor kept in external data by a node attribute (a Constant's) would not be copied into the
    copy's data file: refused, not derived into a graph that reads the wrong bytes."""
    m = onnx.load(str(_quantized(tmp_path)))
    c = helper.make_node("Constant", [], ["c"], name="c", value=numpy_helper.from_array(np.ones(300, np.float32)))
    c.attribute[0].t.data_location = TensorProto.EXTERNAL
    entry = c.attribute[0].t.external_data.add()
    entry.key, entry.value = "location", "elsewhere.bin"
    m.graph.node.append(c)
    g = tmp_path / "attr" / "text_decoder.onnx"
    g.parent.mkdir()
    onnx.save(m, str(g))
    with pytest.raises(VlmexportError, match="cannot derive its int8 prefill graph .*keeps a tensor in external data"):
        cp.int8_prefill_path(g, tmp_path / "cache")


def test_a_weight_another_node_reads_is_kept_and_counted(tmp_path):
    """A converted node's weight that another node also reads stays in the copy (and in copy_bytes);
    the ones only converted nodes read are replaced by their int8 codes."""
    src = _quantized(tmp_path, names=("layers.0.proj", "layers.1.proj", "lm_head"))
    m = onnx.load(str(src))
    node = next(n for n in m.graph.node if n.name.startswith("layers.0"))
    shared = node.input[1]
    m.graph.node.append(helper.make_node("Identity", [shared], ["also"], name="reader"))
    m.graph.output.append(helper.make_empty_tensor_value_info("also"))
    g = _external_model(m, tmp_path, "shared")
    out = tmp_path / "out"
    out.mkdir()
    cp.write_int8_prefill(g, out)
    copy = onnx.load(str(out / g.name))
    names = {i.name for i in copy.graph.initializer}
    other = next(n for n in onnx.load(str(src)).graph.node if n.name.startswith("layers.1")).input[1]
    assert shared in names and other not in names
    held = sum(numpy_helper.to_array(i).nbytes for i in copy.graph.initializer)
    assert cp.copy_bytes(g) <= held <= cp.copy_bytes(g) + 64 * 16  # the rewrite's scalar constants aside


def test_which_cpus_and_modes():
    assert cp.lacks_int8_dot({"avx2", "fma"}, "x86_64")
    assert not cp.lacks_int8_dot({"avx2", "avx512f", "avx512_vnni"}, "x86_64")
    assert not cp.lacks_int8_dot({"avx2", "avx_vnni"}, "x86_64")
    assert not cp.lacks_int8_dot({"fp", "asimd", "asimddp"}, "aarch64")  # ARM: not measured, not used
    assert not cp.lacks_int8_dot(set(), "x86_64")  # flags unreadable: not used
    assert not cp.lacks_int8_dot({"sse4_2"}, "x86_64")  # no AVX2: not measured
    assert CpuPrefill.of(None) is CpuPrefill.AUTO and CpuPrefill.of("int8") is CpuPrefill.INT8
    with pytest.raises(VlmexportError, match="cpu_prefill='fast': choose one of auto, int8, off"):
        CpuPrefill.of("fast")
    assert cp.wanted("int8") and not cp.wanted("off")


def test_cache_key_follows_the_data_file(tmp_path):
    m = onnx.load(str(_quantized(tmp_path)))
    g = tmp_path / "ext" / "d.onnx"
    g.parent.mkdir()
    onnx.save_model(m, str(g), save_as_external_data=True, location="d.onnx.data", size_threshold=0)
    assert [p.name for p in cp.external_files(g)] == ["d.onnx.data"]
    key = cp.cache_key(g)
    assert cp.cache_key(g) == key
    st = (g.parent / "d.onnx.data").stat()
    os.utime(g.parent / "d.onnx.data", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten in place
    assert cp.cache_key(g) != key


def test_a_large_first_derivation_is_announced(tmp_path, monkeypatch, caplog):
    """Deriving takes minutes for a large decoder: from LOUD_COPY_BYTES on, the line is a warning
    (shown at the CLI's default level); below, an info line."""
    import logging

    q = _quantized(tmp_path)
    with caplog.at_level(logging.INFO, logger="vlmexport.runtimes.cpu_prefill"):
        cp.int8_prefill_path(q, tmp_path / "small")
        monkeypatch.setattr(cp, "LOUD_COPY_BYTES", 1)
        cp.int8_prefill_path(q, tmp_path / "large")
    levels = [r.levelno for r in caplog.records if "writing the int8-GEMM prefill copy" in r.message]
    assert levels == [logging.INFO, logging.WARNING]
