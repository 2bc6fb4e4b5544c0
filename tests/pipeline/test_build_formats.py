"""``vlmexport build`` with several formats: a format that cannot run the model is decided
before any work (refused, or built with its deviation measured and recorded), and a format
that fails validation never takes the others down with it."""

from __future__ import annotations

import json
import logging

import pytest
from typer.testing import CliRunner

from vlmexport.pipeline import validate as validate_bundle
from vlmexport.pipeline.build import DeviationRefused, PartialBuildError, build
from vlmexport.pipeline.parity import ValidationError
from vlmexport.runtimes.llamacpp_backend import llamacpp_available

HF = dict(expert_routing="hf_cogvlm", position_ids="hf_cogvlm")


def llama_cpp_or_skip():
    if not llamacpp_available():
        pytest.skip("llama-cpp-python is not installed (pip install 'vlmexport[llamacpp]')")


@pytest.mark.parametrize("arch, overrides, why", [("cogvlm", HF, "hf_cogvlm"), ("llava", {}, "CLS")])
def test_a_gguf_that_cannot_run_the_model_is_refused_before_any_work(tiny_model_dir, tmp_path, arch, overrides,
                                                                     why):
    d = tiny_model_dir(arch, **overrides)
    out = tmp_path / "bundle"
    with pytest.raises(DeviationRefused, match=why) as e:
        build(d, out, formats=("onnx", "gguf"), precisions=("fp32",), reference=False)
    msg = str(e.value)
    assert "\n" not in msg and "--allow-deviations" in msg and "leave gguf out of --format" in msg
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary directory


def test_the_cli_refusal_is_one_line_and_exit_2(tiny_model_dir, tmp_path):
    from vlmexport.cli import app

    d = tiny_model_dir("cogvlm", **HF)
    r = CliRunner().invoke(app, ["build", str(d), "--out", str(tmp_path / "b"), "--format", "onnx,gguf",
                                 "--precision", "fp32"])
    assert r.exit_code == 2 and "--allow-deviations" in r.output and "Traceback" not in r.output


def test_onnx_alone_of_hf_cogvlm_needs_no_flag(tiny_model_dir, tmp_path):
    build(tiny_model_dir("cogvlm", **HF), tmp_path / "b", formats=("onnx",), precisions=("fp32",), reference=False,
          validate=False)
    assert json.loads((tmp_path / "b" / "manifest.json").read_text()).get("semantics_deviations", []) == []


@pytest.mark.llamacpp
def test_allowed_deviation_is_measured_recorded_and_warned_about(tiny_model_dir, tmp_path, caplog):
    import vlmexport

    llama_cpp_or_skip()
    d = tiny_model_dir("cogvlm", seed=4, jitter=True, **HF)
    out = tmp_path / "bundle"
    with pytest.warns(UserWarning, match="hf_cogvlm"):
        r = build(d, out, formats=("onnx", "gguf"), precisions=("fp32",), reference=False, e2e_prompts=4,
                  allow_deviations=True)
    m = json.loads((out / "manifest.json").read_text())
    assert {a["format"] for a in m["artifacts"]} == {"onnx", "gguf"}
    (dev,) = m["semantics_deviations"]
    assert dev["format"] == "gguf" and len(dev["what"]) == 2 and all("llama.cpp" in w for w in dev["what"])
    (measured,) = dev["measured"]
    rows = {(x["part"], x["precision"]): x for x in r.validation["parts"] if x.get("format") == "gguf"}
    pair, text = rows["gguf_pair", "f32"], rows["text_decoder", "f32"]
    # the number recorded is the one measured, and it is a real deviation, not a check
    assert measured["logits_max_abs_diff"] == pair["max_abs_diff"] and "passed" not in pair
    assert pair["relative"] > 10 * text["relative"]
    assert text["passed"] is True  # the text GGUF itself, on the semantics llama.cpp runs, is checked
    e2e = {x["backend"]: x for x in r.validation["end_to_end"]}
    g = e2e["llamacpp-f32"]
    assert g["format"] == "gguf" and g["required"] is False and "passed" not in g
    assert measured["greedy_identical"] == f"{g['identical']}/4"
    assert e2e["onnxruntime-fp32"]["passed"] is True  # ONNX reproduces hf_cogvlm exactly
    card = (out / "README.md").read_text()
    assert "Semantics deviations" in card and f"greedy answers identical {g['identical']}/4" in card
    with caplog.at_level(logging.WARNING):
        vlmexport.load(out, backend="llamacpp")
    assert any("does not run the model as it is" in rec.message and "measured against PyTorch" in rec.message
               for rec in caplog.records)


@pytest.mark.llamacpp
def test_a_failing_format_is_left_out_and_the_others_kept(tiny_model_dir, tmp_path, monkeypatch):
    llama_cpp_or_skip()
    d = tiny_model_dir("cogvlm", seed=2)
    # a GGUF tolerance no llama.cpp run can meet: the gguf validation fails, the onnx one does not
    monkeypatch.setitem(validate_bundle.GGUF_TOLERANCE, "f32", 1e-12)
    out = tmp_path / "bundle"
    with pytest.raises(PartialBuildError, match=r"gguf failed validation and was left out of the bundle") as e:
        build(d, out, formats=("onnx", "gguf"), precisions=("fp32",), reference=False, e2e_prompts=2)
    assert "\n" not in str(e.value)
    m = json.loads((out / "manifest.json").read_text())
    assert {a["format"] for a in m["artifacts"]} == {"onnx"}
    assert not list(out.glob("gguf/*.gguf"))
    (failed,) = m["validation"]["failed"]
    assert failed["format"] == "gguf" and failed["left_out_of_bundle"] is True and failed["passed"] is False
    assert [x["format"] for x in m["validation"]["end_to_end"]] == ["onnx"]

    only = tmp_path / "only-gguf"
    with pytest.raises(ValidationError, match="gguf f32|differs from PyTorch"):
        build(d, only, formats=("gguf",), precisions=("f32",), reference=False, e2e_prompts=2)
    assert not only.exists()
