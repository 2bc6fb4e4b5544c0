"""validate_part: the four checks pass on a good export and each one fails on purpose."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from vlmexport.core.errors import VlmexportError
from vlmexport.exporter.onnx_common import GraphBuilder
from vlmexport.exporter.onnx_vision import StateDictTensors, export_vision_encoder
from vlmexport.pipeline.parity import (
    CHECKS,
    CheckResult,
    Tolerance,
    ValidationError,
    tolerance_for,
    validate_part,
)
from vlmexport.models import Part

pytest.importorskip("onnxruntime")

OUT = ["image_features"]


def pixels(n: int = 2) -> np.ndarray:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3)).numpy()


def reference_of(module: torch.nn.Module):
    def ref(inputs):
        with torch.no_grad():
            return {"image_features": module(torch.from_numpy(inputs["pixel_values"]).float()).numpy()}
    return ref


@pytest.fixture
def model(tiny_model):
    return tiny_model("llava", jitter=True)


@pytest.fixture
def exported(model, tmp_path):
    spec = type(model).part_specs(model.config).vision
    return export_vision_encoder(StateDictTensors(model), spec, tmp_path / "vision_encoder.fp32.onnx", "fp32")


def validate(path, ref, axes, precision="fp32", inputs=None, outputs=OUT, **kw):
    feeds = inputs if inputs is not None else {"pixel_values": pixels().astype(
        np.float16 if precision == "fp16" else np.float32)}
    return validate_part(path, ref, feeds, outputs, axes, precision, "vision_encoder", threads=1, **kw)


def failed_check(excinfo) -> CheckResult:
    results = excinfo.value.results
    assert all(r.passed for r in results[:-1]) and not results[-1].passed
    assert [r.check for r in results] == list(CHECKS[: len(results)])  # ran in order, stopped at the failure
    return results[-1]


def test_good_export_passes_every_check(model, exported):
    results = validate(exported.path, reference_of(model.parts()[Part.VISION_ENCODER]), exported.dynamic_axes)
    assert [r.check for r in results] == list(CHECKS)
    assert all(r.passed and r.part == "vision_encoder" and r.precision == "fp32" for r in results)
    values = results[-1]
    assert 0 < values.max_abs_diff <= values.tolerance == 1e-4
    assert values.to_dict()["check"] == "values"
    with pytest.raises(dataclasses.FrozenInstanceError):
        values.passed = False


def test_tolerances_live_with_the_precision():
    ref = np.array([[-8.0, 2.0]])
    assert tolerance_for("fp32").bound(ref) == pytest.approx(1e-4)
    assert tolerance_for("fp16").bound(ref) == pytest.approx(8e-2)  # relative to the output's scale
    with pytest.raises(ValueError, match="int8"):
        tolerance_for("int8")


# ------------------------------------------------------------ 1. output names
def test_renamed_output_fails_output_names(model, exported, tmp_path):
    proto = onnx.load(str(exported.path), load_external_data=False)
    old = proto.graph.output[0].name
    proto.graph.output[0].name = "features"
    for node in proto.graph.node:
        node.output[:] = ["features" if o == old else o for o in node.output]
    renamed = tmp_path / "renamed.onnx"  # beside the data file, whose location it references
    renamed.write_bytes(proto.SerializeToString())
    with pytest.raises(ValidationError, match=r"outputs are \['features'\] but \['image_features'\]") as exc:
        validate(renamed, reference_of(model.parts()[Part.VISION_ENCODER]), {})
    assert failed_check(exc).check == "output_names"
    assert isinstance(exc.value, VlmexportError)


# ------------------------------------------------------------ 2. dynamic axes
def test_static_model_fails_dynamic_axes(model, tmp_path, monkeypatch):
    """The same encoder exported with a static batch: the declared axis is not in the graph."""
    from vlmexport.exporter import onnx_vision

    spec = type(model).part_specs(model.config).vision
    monkeypatch.setattr(onnx_vision, "NUM_IMAGES", 2)  # a static-shape export
    static = export_vision_encoder(StateDictTensors(model), spec, tmp_path / "static.onnx", "fp32")
    assert static.dynamic_axes == {}
    axes = {"pixel_values": {0: "num_images"}, "image_features": {0: "num_images"}}
    with pytest.raises(ValidationError, match=r"pixel_values axis 0 should be the dynamic axis 'num_images' but "
                                              r"the graph declares 2") as exc:
        validate(static.path, reference_of(model.parts()[Part.VISION_ENCODER]), axes)
    assert failed_check(exc).check == "dynamic_axes"


def test_axis_declared_but_graph_fixed_inside_fails_dynamic_axes(tmp_path):
    """dim_param on the input, but a Reshape to a fixed batch inside: only running catches it."""
    with GraphBuilder(tmp_path / "fixed.onnx", "fixed", "fp32") as g:
        x = g.input("x", ("batch", 4))
        scale = g.weight("scale", torch.arange(4.0))
        g.output(g.node("Reshape", [g.node("Mul", [x, scale]), g.const([2, 4])]), "y", ("batch", 4))
        exported = g.finish()
    feeds = {"x": np.ones((2, 4), np.float32)}
    ref = lambda inputs: {"y": inputs["x"] * np.arange(4.0)}  # noqa: E731
    with pytest.raises(ValidationError, match=r"running with batch=3 failed") as exc:
        validate(exported.path, ref, exported.dynamic_axes, inputs=feeds, outputs=["y"])
    assert failed_check(exc).check == "dynamic_axes"


# ------------------------------------------------------------------ 3. shapes
def test_wrong_shape_fails_shapes(model, tmp_path):
    """An export that keeps CLS, checked against the part that drops it."""
    spec = dataclasses.replace(type(model).part_specs(model.config).vision, keep_cls=True)
    with_cls = export_vision_encoder(StateDictTensors(model), spec, tmp_path / "cls.onnx", "fp32")
    with pytest.raises(ValidationError, match=r"image_features has shape \[2, 17, 48\] but the PyTorch reference "
                                              r"has \[2, 16, 48\]") as exc:
        validate(with_cls.path, reference_of(model.parts()[Part.VISION_ENCODER]), with_cls.dynamic_axes)
    assert failed_check(exc).check == "shapes"


# ------------------------------------------------------------------ 4. values
def test_perturbed_weight_fails_values_with_largest_difference(model, exported):
    encoder = model.parts()[Part.VISION_ENCODER]
    with torch.no_grad():  # the reference drifts from the exported weights
        model.vision_tower.encoder.layers[0].mlp.fc2.weight[3, 5] += 0.05
    ref = reference_of(encoder)
    x = pixels()
    import onnxruntime as ort

    got = ort.InferenceSession(str(exported.path)).run(None, {"pixel_values": x})[0]
    want = ref({"pixel_values": x})["image_features"]
    diff = np.abs(got - want)
    index = np.unravel_index(int(np.argmax(diff)), diff.shape)
    with pytest.raises(ValidationError) as exc:
        validate(exported.path, ref, exported.dynamic_axes)
    msg = str(exc.value)
    assert "output image_features differs from the PyTorch reference by" in msg
    assert f"{float(diff.max()):.6g}" in msg and f"at index {[int(i) for i in index]}" in msg
    assert f"onnx {float(got[index]):.6g}, reference {float(want[index]):.6g}" in msg
    assert "tolerance 0.0001" in msg
    failed = failed_check(exc)
    assert failed.check == "values" and failed.max_abs_diff == pytest.approx(float(diff.max()), rel=1e-5)
    assert failed.tolerance == 1e-4


def test_fp16_export_passes_fp16_tolerance_but_not_fp32(model, tmp_path):
    spec = type(model).part_specs(model.config).vision
    fp16 = export_vision_encoder(StateDictTensors(model), spec, tmp_path / "ve.fp16.onnx", "fp16")
    ref = reference_of(model.parts()[Part.VISION_ENCODER])
    results = validate(fp16.path, ref, fp16.dynamic_axes, precision="fp16")
    assert results[-1].passed and results[-1].max_abs_diff > 1e-4  # fp16 really is coarser than fp32
    with pytest.raises(ValidationError, match="tolerance 0.0001"):
        validate(fp16.path, ref, fp16.dynamic_axes, precision="fp16", tolerance=Tolerance(atol=1e-4))


def test_non_finite_output_fails_values(tmp_path):
    with GraphBuilder(tmp_path / "nan.onnx", "nan", "fp32") as g:
        x = g.input("x", ("batch", 3))
        g.output(g.node("Log", [g.node("Mul", [x, g.weight("w", torch.tensor([1.0, -1.0, 1.0]))])]), "y",
                 ("batch", 3))
        exported = g.finish()
    feeds = {"x": np.ones((2, 3), np.float32)}
    with pytest.raises(ValidationError, match=r"by inf at index \[0, 1\]") as exc:
        validate(exported.path, lambda i: {"y": np.zeros((2, 3), np.float32)}, exported.dynamic_axes,
                 inputs=feeds, outputs=["y"])
    assert failed_check(exc).check == "values"


def test_reference_missing_an_output_fails_shapes(model, exported):
    with pytest.raises(ValidationError, match="returned no output 'image_features'"):
        validate(exported.path, lambda inputs: {"other": np.zeros(1)}, exported.dynamic_axes)


def test_error_names_the_file(model, exported):
    with pytest.raises(ValidationError, match=str(Path(exported.path).name)):
        validate(exported.path, reference_of(model.parts()[Part.VISION_ENCODER]), {}, outputs=["x"])
