"""``build --format tensorrt`` end to end on a tiny model: files, manifest, audit, validation.

The bundle holds the TensorRT profile of each requested precision (int4: the decoder only,
with the fp16 vision parts it runs next to), each graph's audit for both targets, and the
validation rows of the profile on onnxruntime CPU (per part, greedy end to end, and the
int4 scores against fp32). The loader runs the int4 profile with the fp16 vision parts.
"""

from __future__ import annotations

import json

import pytest

import vlmexport
from vlmexport.bundle import Bundle
from vlmexport.core.errors import ConfigError
from vlmexport.pipeline.build import build
from vlmexport.runtimes.tensorrt_backend import profile_files


def test_build_tensorrt_profile(tiny_model_dir, tmp_path, images):
    out = tmp_path / "b"
    r = build(tiny_model_dir("cogvlm", jitter=True), out, formats=("tensorrt",), precisions=("fp32", "int4"),
              reference=False, e2e_prompts=4)
    b = Bundle.open(out)
    have = {(a.part, a.precision) for a in b.artifacts if a.format == "tensorrt"}
    assert have == {(p, q) for p in ("vision_encoder", "connector", "text_decoder", "token_embedding")
                    for q in ("fp32", "fp16")} | {("text_decoder", "int4")}
    td = b.find("text_decoder", "tensorrt", "int4")
    assert td.extra["quantization"]["weights"] == "int4" and td.extra["decode_graph"].endswith(".decode.onnx")
    for targets in td.extra["audit"].values():
        assert set(targets) == {"jetson-orin", "desktop"} and all(t["passed"] for t in targets.values())
    rows = [x for x in r.validation["parts"] if x.get("format") == "tensorrt"]
    assert {(x["part"], x["precision"]) for x in rows} >= {("vision_encoder", "fp32"), ("text_decoder", "fp16")}
    e2e = {x["precision"]: x for x in r.validation["end_to_end"] if x.get("format") == "tensorrt"}
    assert e2e["fp32"]["rate"] == 1.0 and e2e["fp32"]["required"]
    assert e2e["int4"]["prompts"] == 140 and "top1_agreement" in e2e["int4"] and not e2e["int4"]["required"]
    assert json.loads((out / "manifest.json").read_text())["validation"]["end_to_end"]
    pipe = vlmexport.load(out, backend="tensorrt", precision="int4", threads=1)
    files = profile_files(b, "int4")
    assert files.vision_encoder.name == "vision_encoder.fp16.onnx" and files.text_decoder.name == "text_decoder.int4.onnx"
    assert isinstance(pipe.generate("<image> What is shown?", [images[0]], max_new_tokens=4), str)
    # a bundle holding only the TensorRT profile: backend "auto" runs it (on a CPU through onnxruntime)
    assert vlmexport.load(out, threads=1).backend == "tensorrt-profile-onnxruntime-cpu-fp32"


def test_unknown_tensorrt_precision(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="tensorrt"):
        build(tiny_model_dir("cogvlm"), tmp_path / "b", formats=("tensorrt",), precisions=("q4_0",), reference=False,
              validate=False)


def test_int8_profile_has_calibrated_symmetric_qdq_vision_parts(tiny_model_dir, tmp_path, images):
    """int8: the vision encoder and connector as explicit symmetric QDQ graphs (TensorRT's INT8 form),
    calibrated on images, audited for both parsers and scored with the int8 decoder against PyTorch;
    the runtime's int8 profile runs them (on a CPU through onnxruntime)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from vlmexport.pipeline.quantize import QuantOptions
    from vlmexport.pipeline.tensorrt_quant import SOURCE_DIR
    from vlmexport.quant.calib import CalibrationSettings

    out = tmp_path / "b"
    r = build(tiny_model_dir("cogvlm", jitter=True), out, formats=("tensorrt",), precisions=("int8",),
              reference=False, e2e_prompts=2,
              quant=QuantOptions(calibration=CalibrationSettings(images=16, pairs=4), cache_dir=str(tmp_path / "c")))
    b = Bundle.open(out)
    assert not (out / SOURCE_DIR).exists()
    for part in ("vision_encoder", "connector"):
        a = b.find(part, "tensorrt", "int8")
        assert a.file == f"tensorrt/{part}.int8.onnx" and a.extra["quantization"]["quantized_nodes"] > 0
        assert all(t["passed"] for targets in a.extra["audit"].values() for t in targets.values())
        m = onnx.load(str(out / a.file))
        inits = {t.name: t for t in m.graph.initializer}
        q = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
        dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
        assert q and len(dq) > len(q)  # activations quantized and dequantized, weights dequantized
        for n in q + dq:  # symmetric: every zero point an all-zero int8 initializer
            zp = numpy_helper.to_array(inits[n.input[2]])
            assert zp.dtype == np.int8 and not zp.any()
    e2e = {x["precision"]: x for x in r.validation["end_to_end"] if x.get("format") == "tensorrt"}
    assert e2e["int8"]["passed"] and e2e["int8"]["prompts"] == 140
    files = profile_files(b, "int8")
    assert files.vision_encoder.name == "vision_encoder.int8.onnx" and files.connector.name == "connector.int8.onnx"
    pipe = vlmexport.load(out, backend="tensorrt", precision="int8", threads=1)
    assert isinstance(pipe.generate("<image> What is shown?", [images[0]], max_new_tokens=4), str)
