"""GPTQ onto MatMulNBits' grid (vlmexport/quant/gptq.py) and the calibration Hessians it weighs errors with."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_ir")

from vlmexport.quant import gptq as G  # noqa: E402
from vlmexport.quant.calib import _Reader, input_hessians  # noqa: E402


def _activations(rng, rows: int, k: int) -> np.ndarray:
    """Correlated inputs with a few large channels, as LLM activations have."""
    mix = np.eye(k) + 0.5 * rng.standard_normal((k, k)) / np.sqrt(k)
    x = rng.standard_normal((rows, k)) @ mix
    x[:, :3] *= 10
    return x.astype(np.float32)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("values", ["float32", "bf16"])
def test_packing_matches_onnxruntime_bit_for_bit(bits, values):
    from onnxruntime.capi import _pybind_state as C

    rng = np.random.default_rng(0)
    k, n, block = 96, 128, 32
    w = rng.standard_normal((k, n)).astype(np.float32)
    if values == "bf16":  # a bf16-trained checkpoint exported to fp32: ties (x.5 codes, |min| == |max|) happen
        w = (w.view(np.uint32) & 0xFFFF0000).view(np.float32) * 0.25
        w[:32, 1] = np.tile([1.0, -1.0], 16)  # |min| == |max| in one block
    w[:32, 0] = 0  # an all-zero block
    kpack = 8 // bits
    packed = np.zeros((n, k // block, block // kpack), np.uint8)
    zp = np.zeros((n, k // block), np.uint8)
    scales = np.zeros((n, k // block), np.float32)
    getattr(C, f"quantize_matmul_{bits}bits")(packed, w, scales, zp, block, n, k, True)
    codes, s = G.rtn(w, bits, block)
    assert np.array_equal(G.pack(codes, bits, block), packed)
    assert np.array_equal(s, scales)


def test_gptq_with_an_identity_hessian_is_round_to_nearest():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 12)).astype(np.float32)
    codes, scales = G.gptq(w, np.eye(64), 4, 32)
    r_codes, r_scales = G.rtn(w, 4, 32)
    assert np.array_equal(codes, r_codes) and np.array_equal(scales, r_scales)


def test_gptq_carries_rounding_error_to_correlated_inputs():
    """onnxruntime 1.31's vendored GPTQ returns RTN whatever H is; this must not."""
    rng = np.random.default_rng(2)
    k, n = 128, 64
    x = _activations(rng, 2048, k)
    h = x.astype(np.float64).T @ x
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    codes, scales = G.gptq(w, h, 4, 32)
    assert codes.min() >= -8 and codes.max() <= 7
    rtn_err = G.output_error(w, G.dequantize(*G.rtn(w, 4, 32), k), h)
    gptq_err = G.output_error(w, G.dequantize(codes, scales, k), h)
    assert gptq_err < 0.9 * rtn_err, (rtn_err, gptq_err)  # measured 0.83x


def test_gptq_pads_a_partial_block_and_rounds_never_seen_inputs():
    rng = np.random.default_rng(3)
    k, n = 40, 8  # 40 = one block of 32 + 8 padded inputs
    x = _activations(rng, 256, k)
    x[:, 5] = 0  # an input the calibration never excites
    h = x.astype(np.float64).T @ x
    w = rng.standard_normal((k, n)).astype(np.float32)
    codes, scales = G.gptq(w, h, 4, 32)
    assert codes.shape == (n, 64) and scales.shape == (n, 2) and np.isfinite(scales).all()
    assert (codes[:, k:] == 0).all()
    deq = G.dequantize(codes, scales, k)
    assert deq.shape == (k, n) and np.isfinite(deq).all()
    assert G.output_error(w, deq, h) < G.output_error(w, G.dequantize(*G.rtn(w, 4, 32), k), h)
    with pytest.raises(ValueError, match="Hessian"):
        G.gptq(w, np.eye(k + 1))
    with pytest.raises(ValueError, match="4- or 8-bit"):
        G.gptq(w, h, bits=3)


def _one_matmul(path, w: np.ndarray) -> None:
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", w.shape[0]])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", w.shape[1]])],
                          [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def _calibrated_matmul(tmp_path, seed: int, k: int, n: int):
    """One MatMul [k, n] in mm.onnx and a reader over 512 correlated calibration rows (4 batches)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    x = _activations(rng, 512, k)
    src = tmp_path / "mm.onnx"
    _one_matmul(src, w)
    return w, x, src, _Reader([{"x": x[i:i + 128]} for i in range(0, len(x), 128)])


def test_gptq_file_runs_in_onnxruntime_as_computed(tmp_path):
    """The MatMulNBits node onnxruntime runs computes x @ dequantize(codes, scales) of our GPTQ, and is
    closer to the fp32 MatMul on the calibration rows than onnxruntime's RTN file."""
    import onnxruntime as ort

    from vlmexport.quant.quantize import quantize_weight_only

    k = 96
    w, x, src, reader = _calibrated_matmul(tmp_path, 4, k, 40)
    h = input_hessians(src, reader, ["mm"])["mm"]
    ref = x.astype(np.float64).T @ x
    assert np.allclose(h, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())  # float32 GEMMs and sums

    def run(path):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    outs = {}
    for algo in ("rtn", "gptq"):
        q = quantize_weight_only("part", src, tmp_path / f"{algo}.onnx", "int4", algorithm=algo, accuracy_level=None,
                                 block_size=32, reader=reader if algo == "gptq" else None)
        assert [nd.op_type for nd in onnx.load(str(q.path)).graph.node] == ["MatMulNBits"]
        outs[algo] = run(q.path)
    err = q.settings["output_error"]["language"]
    assert err["gptq"] < err["rtn"]
    codes, scales = G.gptq(w, h, 4, 32)
    assert np.allclose(outs["gptq"], x @ G.dequantize(codes, scales, k), atol=1e-4)
    y = x @ w
    assert np.linalg.norm(outs["gptq"] - y) < np.linalg.norm(outs["rtn"] - y)


@pytest.mark.parametrize("block", [64, 128])
def test_gptq_at_larger_blocks_with_int8_compute(tmp_path, block):
    """``--int4-block-size 64/128`` with accuracy_level 4 (int8 activations, the CPU kernel's fast path):
    the node onnxruntime runs computes x @ dequantize(our codes) up to the activations' int8 rounding,
    and GPTQ stays closer to the fp32 MatMul than RTN at the same block size."""
    import onnxruntime as ort

    from vlmexport.quant.quantize import quantize_weight_only

    k = 256
    w, x, src, reader = _calibrated_matmul(tmp_path, 8, k, 48)
    outs = {}
    for algo in ("rtn", "gptq"):
        q = quantize_weight_only("part", src, tmp_path / f"{algo}.onnx", "int4", algorithm=algo, block_size=block,
                                 accuracy_level=4, reader=reader if algo == "gptq" else None)
        (node,) = onnx.load(str(q.path)).graph.node
        attrs = {a.name: a.i for a in node.attribute}
        assert node.op_type == "MatMulNBits" and attrs["block_size"] == block and attrs["accuracy_level"] == 4
        outs[algo] = ort.InferenceSession(str(q.path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    exact = x @ G.dequantize(*G.gptq(w, input_hessians(src, reader, ["mm"])["mm"], 4, block), k)
    assert np.linalg.norm(outs["gptq"] - exact) < 0.02 * np.linalg.norm(exact)  # int8 activations
    y = x @ w
    assert np.linalg.norm(outs["gptq"] - y) < np.linalg.norm(outs["rtn"] - y)


def test_feeds_for_inputs_the_graph_lacks_are_left_out(tmp_path):
    """Decoder calibration feeds hold token_type; a decoder without experts takes none."""
    w, x, src, _ = _calibrated_matmul(tmp_path, 5, 32, 8)
    extra = _Reader([{"x": x[:128], "token_type": np.zeros((1, 128), np.int64)}])
    h = input_hessians(src, extra, ["mm"])["mm"]
    assert np.allclose(h, x[:128].astype(np.float64).T @ x[:128], rtol=1e-5, atol=1e-6)


def test_hessians_are_per_expert_and_name_bad_layers(tmp_path):
    rng = np.random.default_rng(5)
    src = tmp_path / "mm.onnx"
    _one_matmul(src, rng.standard_normal((16, 4)).astype(np.float32))
    with pytest.raises(Exception, match="no MatMul"):
        input_hessians(src, _Reader([{"x": np.ones((2, 16), np.float32)}]), ["nope"])
    bad = np.ones((2, 16), np.float32)
    bad[0, 3] = np.nan
    with pytest.raises(Exception, match="NaN/inf activations.*'mm'"):
        input_hessians(src, _Reader([{"x": bad}]), ["mm"])


def test_gptq_without_calibration_rows_is_an_error_not_silent_rtn(tmp_path):
    from vlmexport.core.errors import ConfigError
    from vlmexport.quant.quantize import quantize_weight_only

    src = tmp_path / "mm.onnx"
    _one_matmul(src, np.random.default_rng(6).standard_normal((32, 8)).astype(np.float32))
    for reader in (_Reader([]), _Reader([{"x": np.zeros((0, 32), np.float32)}])):
        with pytest.raises(ConfigError, match="'mm' saw no calibration rows.*--int4-algorithm rtn"):
            quantize_weight_only("part", src, tmp_path / "q.onnx", "int4", algorithm="gptq", reader=reader)
    assert not (tmp_path / "q.onnx").exists()


def test_a_weight_shared_by_two_matmuls_is_rounded_to_nearest(tmp_path):
    """onnxruntime writes one packed copy per weight name, so per-node GPTQ codes cannot both live there."""
    import onnxruntime as ort

    from vlmexport.quant.quantize import quantize_weight_only

    rng = np.random.default_rng(7)
    w = (rng.standard_normal((64, 16)) * 0.05).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["ya"], name="mA"),
                           helper.make_node("MatMul", ["b", "w"], ["yb"], name="mB")], "g",
                          [helper.make_tensor_value_info(i, TensorProto.FLOAT, ["n", 64]) for i in "ab"],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["n", 16]) for o in ("ya", "yb")],
                          [numpy_helper.from_array(w, "w")])
    src = tmp_path / "two.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(src))
    x = {"a": _activations(rng, 256, 64), "b": _activations(rng, 256, 64)}
    q = quantize_weight_only("part", src, tmp_path / "q.onnx", "int4", algorithm="gptq", accuracy_level=None,
                             block_size=32, reader=_Reader([x]))
    assert "output_error" not in q.settings  # no node was fitted
    ya, yb = ort.InferenceSession(str(q.path), providers=["CPUExecutionProvider"]).run(None, x)
    deq = G.dequantize(*G.rtn(w, 4, 32), 64)
    np.testing.assert_allclose(ya, x["a"] @ deq, atol=1e-4)
    np.testing.assert_allclose(yb, x["b"] @ deq, atol=1e-4)


def test_hessians_take_a_feed_holding_more_than_the_graph_reads(tmp_path):
    """The decoder feeds carry token_type, which only a decoder with visual experts reads: a
    decoder without experts (llava's) has no such input, and its GPTQ Hessians must still come."""
    w, x, src, _ = _calibrated_matmul(tmp_path, 5, 16, 8)
    reader = _Reader([{"x": x[:64], "token_type": np.zeros((1, 64), np.int64)}])
    h = input_hessians(src, reader, ["mm"])["mm"]
    ref = x[:64].astype(np.float64).T @ x[:64]
    assert np.allclose(h, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
