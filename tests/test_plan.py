"""`vlmexport plan`: the memory terms, fit / best precision / largest context, the roofline, the CLI."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from vlmexport.bundle import Bundle
from vlmexport.cli import app
from vlmexport.plan import (DEVICES, MEASURED, WEIGHT_BYTES, DeviceSpec, ModelShape, artifact_sets,
                            decode_bytes_per_token, estimate, host_device, kv_cache_bytes, plan)

ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory, tokenizer_path, tiny_model):
    from vlmexport.core.preprocess import PreprocessConfig
    from vlmexport.models.checkpoint import save_pretrained

    model = tiny_model("cogvlm", seed=0)
    root = tmp_path_factory.mktemp("plan")
    src = save_pretrained(model, root / "model", tokenizer_path, PreprocessConfig(image_size=32))
    out = root / "bundle"
    r = CliRunner().invoke(app, ["build", str(src), "--out", str(out), "--format", "onnx", "--precision",
                                 "fp32,fp16", "--no-validate", "--no-reference"])
    assert r.exit_code == 0, r.output
    return out


def shape(tiny_bundle) -> ModelShape:
    return ModelShape.from_manifest(Bundle.open(tiny_bundle).section("model"))


def test_kv_cache_is_layers_x2_x_kv_heads_x_head_dim_x_context_x_bytes(tiny_bundle):
    s = shape(tiny_bundle)
    assert kv_cache_bytes(s, 100, 2) == s.num_layers * 2 * s.num_kv_heads * s.head_dim * 100 * 2
    sets = {(a.backend, a.precision): a for a in artifact_sets(Bundle.open(tiny_bundle))}
    assert sets["onnxruntime", "fp32"].kv_bytes_per_element == 4 and sets["onnxruntime", "fp16"].kv_bytes_per_element == 2
    # what each backend loads: every ONNX part of that precision, nothing else
    b = Bundle.open(tiny_bundle)
    parts = ("vision_encoder", "connector", "text_decoder", "token_embedding")
    assert sets["onnxruntime", "fp16"].files_bytes == sum(b.find(p, "onnx", "fp16").total_size_bytes for p in parts)


def test_a_jetson_fits_the_tiny_bundle_at_its_whole_context(tiny_bundle):
    p = plan(tiny_bundle, "orin-nano-8gb")
    assert p.context == p.model_context and all(e.fits and e.max_context == p.model_context for e in p.estimates)
    assert p.best("onnxruntime").precision == "fp32"
    e = p.estimates[0]
    assert e.peak_gb == pytest.approx(e.weights_gb + e.kv_cache_gb + e.activations_gb + e.overhead_gb)
    assert e.overhead_gb >= 0.8  # the CUDA context of a unified-memory board


def test_best_precision_and_largest_context_follow_the_budget(tiny_bundle):
    s = shape(tiny_bundle)
    sets = {a.precision: a for a in artifact_sets(Bundle.open(tiny_bundle))}
    host = DeviceSpec("tiny", "test device", 1.0, 10.0, None, False, 0.0, ("onnxruntime",))
    fp32 = estimate(s, sets["fp32"], host, s.max_length, 1)
    fp16 = estimate(s, sets["fp16"], host, s.max_length, 1)
    assert fp16.weights_gb < fp32.weights_gb * 2.5  # fp16 widened to fp32 on a CPU: measured, not assumed
    small, big = sorted((fp32.peak_gb, fp16.peak_gb))
    between = replace(host, memory_gb=(small + big) / 2)
    fits = {e.precision: e.fits for e in (estimate(s, sets[p], between, s.max_length, 1) for p in ("fp32", "fp16"))}
    assert sorted(fits.values()) == [False, True]
    # a budget between the peaks at context 8 and at the full context: the largest context is in between, exactly
    a = sets["fp32"]
    lo, hi = estimate(s, a, host, 8, 1).peak_gb, fp32.peak_gb
    tight = replace(host, memory_gb=(lo + hi) / 2)
    m = estimate(s, a, tight, s.max_length, 1).max_context
    assert 8 <= m < s.max_length
    assert estimate(s, a, tight, m, 1).fits and not estimate(s, a, tight, m + 1, 1).fits
    nothing = replace(host, memory_gb=0.01)
    assert estimate(s, a, nothing, s.max_length, 1).max_context == 0


def test_roofline_scales_with_bandwidth_and_reads_one_expert(tiny_bundle):
    s = shape(tiny_bundle)
    a = next(x for x in artifact_sets(Bundle.open(tiny_bundle)) if x.precision == "fp32")
    slow, fast = (estimate(s, a, DEVICES[n], 64, 1) for n in ("orin-nano-8gb", "agx-orin-64gb"))
    assert fast.decode_tok_s / slow.decode_tok_s == pytest.approx(204.8 / 68.0)
    assert s.has_experts and decode_bytes_per_token(s, a, 64) < a.decoder_bytes


def test_host_device_reads_this_machine():
    h = host_device(bandwidth_gbs=12.5)
    assert h.memory_gb > 1 and h.bandwidth_gbs == 12.5 and "onnxruntime" in h.backends and not h.gpu
    assert set(MEASURED) == {"onnxruntime", "llamacpp"}
    assert all(p in WEIGHT_BYTES for m in MEASURED.values() for p in m["per_byte"])


def test_cli_table_json_and_errors(tiny_bundle):
    runner = CliRunner()
    r = runner.invoke(app, ["plan", str(tiny_bundle), "--device", "l4", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["device"]["compute_capability"] == "8.9" and data["best_precision"]["onnxruntime"] == "fp32"
    r = runner.invoke(app, ["plan", str(tiny_bundle), "--device", "orin-nx-16gb", "--context", "64"],
                      env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "best precision that fits: fp32" in ANSI.sub("", r.output)
    for args, msg in ((["--device", "raspberry"], "unknown device"), (["--device", "l4", "--context", "0"], "--context")):
        r = runner.invoke(app, ["plan", str(tiny_bundle), *args])
        assert r.exit_code == 2 and msg in ANSI.sub("", r.output), r.output


def test_activations_follow_each_runtime_and_its_measured_terms(tiny_bundle):
    """onnxruntime keeps the decoder's arena and encodes the next images on top (the two working
    sets add up); llama.cpp reuses one compute buffer (the larger); each with its measured terms."""
    from vlmexport.plan import activation_bytes, activation_terms

    s = shape(tiny_bundle)
    dec, vis = activation_terms(s, s.max_length, 2, "onnxruntime")
    terms = {"fixed_mb": 3.0, "decoder": 1.5, "vision": 2.0}
    for backend in ("onnxruntime", "llamacpp"):
        d, v = activation_terms(s, s.max_length, 2, backend)
        expected = 3.0 * (1 << 20) + (1.5 * d + 2.0 * v if backend == "onnxruntime" else max(1.5 * d, 2.0 * v))
        assert activation_bytes(s, s.max_length, 2, backend, {backend: {"activations": terms}}) == pytest.approx(expected)
    sets = {a.precision: a for a in artifact_sets(Bundle.open(tiny_bundle))}
    host = DeviceSpec("tiny", "test device", 64.0, 10.0, None, False, 0.0, ("onnxruntime",))
    measured = {"onnxruntime": {**MEASURED["onnxruntime"], "activations": terms}}
    e = estimate(s, sets["fp32"], host, s.max_length, 2, measured=measured)
    assert e.activations_gb * 1e9 == pytest.approx(3.0 * (1 << 20) + 1.5 * dec + 2.0 * vis)
