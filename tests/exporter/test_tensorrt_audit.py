"""The TensorRT operator audit: the table as data, and every rule able to fail.

Small graphs built here break one rule each (custom domain, unsupported op, wrong input
type, computed ``axes``, non-zero / unsigned zero points, the block-quantized
DequantizeLinear shape rules); well-formed ones (signed INT4 weights, 2-D block scales,
no zero point, opset 21) pass. The contrib-op decoder of the onnx format is rejected
for its ``com.microsoft`` ops, which is why the TensorRT profile exists.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from vlmexport.exporter.onnx_common import StateDictTensors
from vlmexport.exporter.onnx_decoder import export_text_decoder
from vlmexport.exporter.tensorrt_audit import (
    TARGETS,
    AuditError,
    audit_model,
    format_audit,
    load_table,
    target_table,
)


def model(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10 if opset >= 21 else 8)


def vi(name, t, shape):
    return helper.make_tensor_value_info(name, t, shape)


def int4_dq_model(k=64, n=8, block=32, scale_shape=None, zero_point=None, axis=0, opset=21, signed=True):
    rng = np.random.default_rng(0)
    codes = rng.integers(-8, 8, size=(k, n)).astype(np.int8)
    w = helper.make_tensor("w", TensorProto.INT4 if signed else TensorProto.UINT4, [k, n],
                           (codes if signed else codes + 8).flatten().tolist())
    sshape = scale_shape or ([k // block, n] if axis == 0 else [k, n // block])
    s = numpy_helper.from_array(rng.random(sshape).astype(np.float32) + 0.1, "s")
    ins = ["w", "s"]
    inits = [w, s]
    if zero_point is not None:
        zp = helper.make_tensor("zp", TensorProto.INT4, sshape, [zero_point] * int(np.prod(sshape)))
        inits.append(zp)
        ins.append("zp")
    nodes = [helper.make_node("DequantizeLinear", ins, ["wf"], name="dq", axis=axis, block_size=block),
             helper.make_node("MatMul", ["x", "wf"], ["y"], name="mm")]
    return model(nodes, [vi("x", TensorProto.FLOAT, [1, k])], [vi("y", TensorProto.FLOAT, [1, n])], inits, opset)


def reasons(m, target="jetson-orin"):
    return [f.reason for f in audit_model(m, target).findings]


def test_table_names_its_sources_and_versions():
    t = load_table()
    assert set(TARGETS) <= set(t["targets"])
    jet, desk = target_table("jetson-orin"), target_table("desktop")
    assert jet["tensorrt"] == "10.3" and "onnx-tensorrt" in jet["source"] and jet["opset_max"] == 20
    assert desk["tensorrt"] == "10.15" and desk["opset_max"] == 24
    # the ops the issue names: missing in 10.3, present in 10.15
    for op in ("Attention", "RotaryEmbedding", "RMSNormalization"):
        assert not jet["ops"].get(op, {"supported": False})["supported"]
        assert desk["ops"][op]["supported"]
    assert "INT4" in jet["ops"]["DequantizeLinear"]["types"]
    with pytest.raises(AuditError, match="jetson-orin"):
        target_table("xavier")


def test_custom_domain_and_unsupported_op():
    m = model([helper.make_node("SkipSimplifiedLayerNormalization", ["x", "x", "w"], ["y"], name="ssln",
                                domain="com.microsoft"),
               helper.make_node("Unique", ["x"], ["z"], name="uniq")],
              [vi("x", TensorProto.FLOAT, [2, 4])], [vi("z", TensorProto.FLOAT, [None])],
              [numpy_helper.from_array(np.ones(4, np.float32), "w")])
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    r = reasons(m)
    assert any("com.microsoft" in x for x in r)
    assert any("not supported" in x for x in r)  # Unique: "N" in both tables
    for t in TARGETS:
        assert {f.op for f in audit_model(m, t).findings} == {"SkipSimplifiedLayerNormalization", "Unique"}


def test_input_types_are_checked():
    ok = model([helper.make_node("MatMul", ["a", "b"], ["c"], name="mm")],
               [vi("a", TensorProto.FLOAT16, [2, 2]), vi("b", TensorProto.FLOAT16, [2, 2])],
               [vi("c", TensorProto.FLOAT16, [2, 2])])
    assert audit_model(ok).ok
    bad = model([helper.make_node("MatMul", ["a", "b"], ["c"], name="mm")],
                [vi("a", TensorProto.INT32, [2, 2]), vi("b", TensorProto.INT32, [2, 2])],
                [vi("c", TensorProto.INT32, [2, 2])])
    assert any("INT32" in x for x in reasons(bad))


def test_computed_axes_are_rejected():
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape", start=0, end=1),
             helper.make_node("Sub", ["s", "s"], ["axes"], name="sub"),
             helper.make_node("Unsqueeze", ["x", "axes"], ["y"], name="unsq")]
    m = model(nodes, [vi("x", TensorProto.FLOAT, [3])], [vi("y", TensorProto.FLOAT, [1, 3])])
    assert any("`axes`" in x for x in reasons(m))
    const = model([helper.make_node("Unsqueeze", ["x", "axes"], ["y"], name="unsq")],
                  [vi("x", TensorProto.FLOAT, [3])], [vi("y", TensorProto.FLOAT, [1, 3])],
                  [numpy_helper.from_array(np.array([0], np.int64), "axes")])
    assert audit_model(const).ok


def test_int4_block_dequantize_rules():
    good = int4_dq_model()
    for t in TARGETS:
        r = audit_model(good, t)
        assert r.ok, r.findings
    assert any("opset 21" in w for w in audit_model(good, "jetson-orin").warnings)  # newer than 10.3's documented 20
    assert any("expected [2, 8]" in x for x in reasons(int4_dq_model(scale_shape=[4, 8])))
    assert any("does not divide" in x for x in reasons(int4_dq_model(k=48, block=32, scale_shape=[1, 8])))
    assert any("opset >= 21" in x for x in reasons(int4_dq_model(opset=17)))
    assert any("zero point" in x for x in reasons(int4_dq_model(zero_point=1)))
    assert audit_model(int4_dq_model(zero_point=0)).ok  # an all-zero zero point is symmetric
    assert any("UINT4" in x for x in reasons(int4_dq_model(signed=False)))


def test_int8_qdq_rules():
    def qdq(zp_type, zp_value, name="q"):
        zp = helper.make_tensor("zp", zp_type, [], [zp_value])
        s = numpy_helper.from_array(np.array(0.1, np.float32), "s")
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name=name),
                 helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["y"], name="dq")]
        return model(nodes, [vi("x", TensorProto.FLOAT, [4])], [vi("y", TensorProto.FLOAT, [4])], [s, zp])

    assert audit_model(qdq(TensorProto.INT8, 0)).ok
    assert any("zero point" in x for x in reasons(qdq(TensorProto.INT8, 3)))
    assert any("UINT8" in x for x in reasons(qdq(TensorProto.UINT8, 0)))


def test_contrib_op_decoder_is_rejected(tiny_model, tmp_path):
    m = tiny_model("cogvlm")
    spec = type(m).part_specs(m.config).decoder
    g = export_text_decoder(StateDictTensors(m), spec, tmp_path / "d.onnx", "fp16")
    r = audit_model(g.path, "jetson-orin")
    ops = {f.op for f in r.findings}
    assert {"GroupQueryAttention", "RotaryEmbedding", "SkipSimplifiedLayerNormalization"} <= ops
    text = format_audit([r], tmp_path)
    assert "d.onnx" in text and "GroupQueryAttention" in text
