"""The command line, driven as a user would: train -> eval -> build -> inspect -> run."""

from __future__ import annotations

import json
import shutil
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vlmexport.cli import app
from vlmexport.core.errors import VlmexportError
from vlmexport.pipeline.bench import machine_info, machine_title
from vlmexport.training.recipes import StageSpec, demo_recipe
from vlmexport.training.trainer import TrainConfig

runner = CliRunner()
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    result.plain = ANSI.sub("", result.output)
    return result


def tiny_recipe_file(tmp_path) -> str:
    r = demo_recipe()
    r.model.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   vision_config=dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96,
                                      num_hidden_layers=2, num_heads=4))
    r.image_size, r.tokenizer_corpus, r.eval_every = 32, 400, 0
    r.tokenizer_vocab = 400
    r.stages = [StageSpec(stage="vision", train=TrainConfig(steps=3, batch_size=4, warmup_steps=1, save_every=10)),
                StageSpec(stage="scratch", train=TrainConfig(steps=3, batch_size=4, warmup_steps=1, save_every=10),
                          dense_weight=0.5)]
    path = tmp_path / "tiny.json"
    path.write_text(r.to_json())
    return str(path)


def test_every_command_has_help_with_examples():
    result = invoke("--help")
    assert result.exit_code == 0
    for cmd in ("train", "eval", "run", "build", "inspect", "bench", "serve", "plan"):
        assert cmd in result.plain
        sub = invoke(cmd, "--help")
        assert sub.exit_code == 0 and "Examples" in sub.plain and "$ vlmexport" in sub.plain, cmd


@pytest.mark.slow
def test_train_eval_build_inspect_run(tmp_path):
    out = tmp_path / "run"
    r = invoke("train", "--recipe", tiny_recipe_file(tmp_path), "--out", out)
    assert r.exit_code == 0, r.plain
    model = out / "model"
    assert (model / "model.safetensors").is_file() and (out / "stage2-scratch" / "DONE").is_file()

    report = tmp_path / "eval.json"
    r = invoke("eval", model, "--n-per-category", "2", "--json", report)
    assert r.exit_code == 0, r.plain
    data = json.loads(report.read_text())
    assert set(data["per_category"]) == {"colour", "shape", "count", "position", "existence", "reading", "chart"}
    assert "overall" in r.plain and "MME" in r.plain

    bundle = tmp_path / "bundle"
    r = invoke("build", model, "--out", bundle, "--e2e-prompts", "7")
    assert r.exit_code == 0, r.plain
    assert (bundle / "manifest.json").is_file() and "validation against PyTorch" in r.plain

    r = invoke("inspect", bundle)
    assert r.exit_code == 0 and "text_decoder" in r.plain and "token_embedding" in r.plain

    img = tmp_path / "img.png"
    Image.fromarray(np.full((40, 50, 3), 200, np.uint8)).save(img)
    answers = {}
    for backend in ("torch", "onnxruntime"):
        r = invoke("run", bundle, "--backend", backend, "--image", img, "--prompt", "What colour is the star?")
        assert r.exit_code == 0, r.plain
        answers[backend] = r.plain.strip()
    assert answers["torch"] == answers["onnxruntime"]

    from vlmexport.runtimes.loader import load

    key = "session.intra_op.allow_spinning"
    # by default the decoder's threads spin inside its runs and the vision parts' do not
    default = load(bundle, backend="onnxruntime").session
    assert default._opts(decoder=True).get_session_config_entry(key) == "1"
    assert default._opts().get_session_config_entry(key) == "0"
    for spin, vision, decoder in ((True, "1", "1"), ("all", "1", "1"), ("off", "0", "0"), (False, "0", "0")):
        s = load(bundle, backend="onnxruntime", spin=spin).session
        assert (s._opts().get_session_config_entry(key), s._opts(True).get_session_config_entry(key)) == (
            vision, decoder), spin
    spun = load(bundle, backend="onnxruntime", spin=True).session._opts()
    assert spun.get_session_config_entry("session.force_spinning_stop") == "1"  # no spinning between runs
    with pytest.raises(VlmexportError, match="spin='fast': choose one of off, decode, all"):
        load(bundle, backend="onnxruntime", spin="fast")

    report = tmp_path / "bench.json"
    r = invoke("bench", bundle, "--backend", "torch,onnxruntime", "--repeats", "1", "--decode-tokens", "3",
               "--prompt-tokens", "4", "--accuracy", "2", "--json", report)
    assert r.exit_code == 0, r.plain
    data = json.loads(report.read_text())
    rows = {(row["backend"].split("-")[0], row["precision"]): row for row in data["rows"]}
    assert set(rows) == {("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "fp16")}
    onnx_fp16 = sum(f.stat().st_size for f in (bundle / "onnx").glob("*.fp16.*"))
    assert abs(rows[("onnxruntime", "fp16")]["size_mb"] * 1e6 - onnx_fp16) < 1
    for row in rows.values():
        assert row["decode_tok_s"] > 0 and 0.0 <= row["accuracy"] <= 1.0
        assert row["prefill_gflops"] > 0 and row["prefill_fraction_of_peak"] > 0
    assert data["gemm_gflops"] > 0
    # the ceilings are measured before and after the backends, and fractions use the higher one
    assert len(data["bandwidth_samples_gbs"]) == 2 and data["bandwidth_gbs"] == max(data["bandwidth_samples_gbs"])
    assert data["gemm_gflops"] == max(data["gemm_samples_gflops"])
    for row in rows.values():
        assert row["bandwidth_fraction"] == pytest.approx(row["achieved_gbs"] / data["bandwidth_gbs"])
    # bytes per decode token counted from the fp32 file agree with the analytic count (torch's row)
    from vlmexport.pipeline.bench import decode_weight_bytes

    model = json.loads((bundle / "manifest.json").read_text())["model"]
    assert rows[("onnxruntime", "fp32")]["weights_gb_per_token"] * 1e9 == pytest.approx(
        decode_weight_bytes(model, 4), rel=1e-3)
    assert rows[("onnxruntime", "fp16")]["weights_gb_per_token"] < 0.6 * rows[("onnxruntime", "fp32")][
        "weights_gb_per_token"]
    # against torch fp32 (onnxruntime fp32, fp16) and against onnxruntime fp32 (torch, fp16)
    assert set(data["ratios"]) == {"onnxruntime-fp32 / torch-float32", "onnxruntime-fp16 / torch-float32",
                                   "torch-float32 / onnxruntime-fp32", "onnxruntime-fp16 / onnxruntime-fp32"}
    assert (tmp_path / "bench.png").stat().st_size > 0

    # a tampered artifact: one line naming the file, for the runtime and for inspect --verify full
    p = bundle / "onnx" / "connector.fp32.onnx"
    data = bytearray(p.read_bytes())
    data[-1] ^= 1
    p.write_bytes(bytes(data))
    for args in (("run", bundle, "--backend", "onnxruntime", "--image", img, "--prompt", "hi"),
                 ("inspect", bundle, "--verify", "full")):
        r = invoke(*args)
        assert r.exit_code == 2 and r.plain.startswith("error:") and "connector.fp32.onnx" in r.plain, r.plain
        assert "sha256 mismatch" in r.plain and "Traceback" not in r.plain


def test_eval_seed_draws_another_test_split(tmp_path):
    """`vlmexport eval --seed N` scores the shipped model on a test split drawn with another
    generator seed (how the README's held-out figure is rerun); the report records the seed."""
    reports = {}
    for seed in ("0", "20261206"):
        path = tmp_path / f"eval-{seed}.json"
        r = invoke("eval", "--n-per-category", "2", "--seed", seed, "--json", path)
        assert r.exit_code == 0, r.plain
        reports[seed] = json.loads(path.read_text())
    assert [reports[s]["meta"]["seed"] for s in ("0", "20261206")] == [0, 20261206]
    questions = {s: [(p["image_id"], p["question"]) for p in reports[s]["predictions"]] for s in reports}
    assert questions["0"] != questions["20261206"]

def test_errors_are_one_line(tmp_path):
    r = invoke("eval", tmp_path / "missing")
    assert r.exit_code == 2
    assert r.plain.startswith("error:") and len(r.plain.strip().splitlines()) <= 2 and "Traceback" not in r.plain
    r = invoke("train", "--recipe", "nope", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "unknown recipe" in r.plain
    r = invoke("inspect", tmp_path)
    assert r.exit_code == 2 and "not a vlmexport bundle" in r.plain
    r = invoke("bench", tmp_path, "--accuracy", "3")
    assert r.exit_code == 2 and "even number" in r.plain


def test_bench_runs_several_bundles_side_by_side(tmp_path, tiny_model_dir):
    """Two builds in one bench process: a row per bundle and backend, labelled in the table and the
    ratios; what two bundles share byte for byte (a copied bundle) is timed once."""
    bundles = []
    for seed in (0, 1):
        b = tmp_path / f"b{seed}" / "bundle"  # the same name twice: labels fall back to the paths
        r = invoke("build", tiny_model_dir("cogvlm", seed=seed), "--out", b, "--precision", "fp32", "--no-validate")
        assert r.exit_code == 0, r.plain
        bundles.append(b)
    args = ("--backend", "torch,onnxruntime", "--precision", "fp32", "--repeats", "1", "--decode-tokens", "2",
            "--prompt-tokens", "2")
    r = invoke("bench", *bundles, *args, "--json", tmp_path / "two.json")
    assert r.exit_code == 0, r.plain
    two = json.loads((tmp_path / "two.json").read_text())
    names = [str(b) for b in bundles]
    assert two["bundles"] == names
    # the title names the CPU with its SIMD extensions (two VMs of one name can differ there)
    assert two["machine"]["cpu_features"] == machine_info()["cpu_features"]
    assert f": {machine_title(two['machine'])}, {two['threads']} threads, read bandwidth" in r.plain, r.plain
    assert [(row["bundle"], row["backend"]) for row in two["rows"]] == [
        (n, be) for n in names for be in ("torch-float32", "onnxruntime-fp32")]
    # each row against its own bundle's torch row: two models never share a base
    assert set(two["ratios"]) == {f"{a} [b{k}/bundle] / {z} [b{k}/bundle]" for k in (0, 1) for a, z in (
        ("onnxruntime-fp32", "torch-float32"), ("torch-float32", "onnxruntime-fp32"))}
    # the labels' brackets print as text (rich markup escaped), in the ratio lines too
    assert "onnxruntime-fp32 [b1/bundle] / torch-float32 [b1/bundle]: decode x" in r.plain, r.plain
    # piped output (as here): a Markdown table with every cell whole, one line per row, however wide
    table = [line for line in r.plain.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 4 and "…" not in r.plain
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[0] == "bundle" and header[-1] == "exact match" and "decode tok/s" in header
    for line, (n, be) in zip(table[2:], [(k, be) for k in (0, 1) for be in ("torch-float32", "onnxruntime-fp32")]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:2] == [f"b{n}/bundle", be] and len(cells) == len(header), line
        assert float(cells[header.index("decode tok/s")]) > 0

    # interleaved: every row loaded first, then timed round by round; the same rows and ratios
    r = invoke("bench", *bundles, *args, "--repeats", "2", "--interleave", "--json", tmp_path / "inter.json")
    assert r.exit_code == 0, r.plain
    inter = json.loads((tmp_path / "inter.json").read_text())
    assert inter["interleaved"] and not two["interleaved"] and "interleaved round by round" in r.plain
    assert [(row["bundle"], row["backend"]) for row in inter["rows"]] == [
        (row["bundle"], row["backend"]) for row in two["rows"]]
    assert set(inter["ratios"]) == set(two["ratios"]) and all(row["decode_tok_s"] > 0 for row in inter["rows"])

    twin = tmp_path / "twin"
    shutil.copytree(bundles[0], twin)
    r = invoke("bench", bundles[0], twin, *args, "--json", tmp_path / "twin.json")
    assert r.exit_code == 0, r.plain
    rows = json.loads((tmp_path / "twin.json").read_text())["rows"]
    assert [(row["bundle"], row["backend"]) for row in rows] == [(names[0], "torch-float32"),
                                                                  (names[0], "onnxruntime-fp32")]


def test_bad_image_is_a_clear_error(tmp_path, tiny_model_dir):
    model = tiny_model_dir("cogvlm")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    r = invoke("run", model, "--image", bad, "--prompt", "hi")
    assert r.exit_code == 2 and "not a readable image" in r.plain


@pytest.mark.slow
def test_sigterm_during_build_removes_partial_output_and_keeps_the_previous_bundle(tmp_path):
    """A scheduler's timeout (SIGTERM) mid-build: no hidden work directory is left behind,
    what was at --out before is untouched, and the exit status says terminated (143)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "bundle"
    first = invoke("build", "--out", out, "--format", "onnx", "--precision", "fp32")
    assert first.exit_code == 0, first.plain
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*"))
    proc = subprocess.Popen([sys.executable, "-c", "from vlmexport.cli import app; app()", "build", "--out", str(out),
                             "--format", "onnx"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"})
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(tmp_path.glob(".bundle.tmp-*")):
        time.sleep(0.05)
    assert list(tmp_path.glob(".bundle.tmp-*")), proc.communicate()[0].decode()
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    text = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 143, text
    assert "terminated" in text
    assert [p.name for p in tmp_path.glob(".bundle.*")] == [".bundle.lock"]  # the build lock's (empty) file stays
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*")) == before


@pytest.mark.llamacpp
def test_bench_times_raw_llama_cpp_as_the_anchor_row(tmp_path, tiny_model_dir):
    """``llamacpp-raw``: llama.cpp itself on the bundle's text GGUF, timed beside the llamacpp backend,
    sequentially and interleaved, with the backend's ratio against it."""
    from vlmexport.runtimes.llamacpp_backend import llamacpp_available

    if not llamacpp_available():
        pytest.skip("llama-cpp-python is not installed")
    b = tmp_path / "b"
    r = invoke("build", tiny_model_dir("cogvlm"), "--out", b, "--format", "gguf", "--precision", "f32",
               "--no-validate", "--no-reference")
    assert r.exit_code == 0, r.plain
    for extra in ((), ("--interleave",)):
        r = invoke("bench", b, "--backend", "llamacpp,llamacpp-raw", "--repeats", "2", "--decode-tokens", "3",
                   "--prompt-tokens", "4", "--json", tmp_path / "g.json", *extra)
        assert r.exit_code == 0, r.plain
        data = json.loads((tmp_path / "g.json").read_text())
        rows = {row["backend"]: row for row in data["rows"]}
        assert set(rows) == {"llamacpp-f32", "llamacpp-raw-f32"}
        raw = rows["llamacpp-raw-f32"]
        # the same number of positions as the image prompt, text only: no image encode
        assert raw["prefill_tokens"] == rows["llamacpp-f32"]["prefill_tokens"] and raw["image_encode_ms"] == 0
        assert raw["decode_tok_s"] > 0 and raw["ttft_ms"] > 0
        ratio = data["ratios"]["llamacpp-f32 / llamacpp-raw-f32"]
        assert ratio["image_encode"] is None and ratio["decode_tok_s"] > 0
        assert "llamacpp-f32 / llamacpp-raw-f32: decode x" in r.plain


def test_the_gate_table_shows_a_cpu_prefill_that_could_not_be_scored(capsys, monkeypatch):
    from vlmexport import cli
    from vlmexport.cli import _print_gates

    monkeypatch.setattr(cli.out, "width", 200)  # one line per row, whatever the terminal

    row = {"prompts": 14, "top1_agreement": 1.0, "mean_cosine": 0.999, "accuracy": 95.0, "accuracy_drop_points": 0.2,
           "gates": [{"gate": "max_accuracy_drop", "measured": 0.2, "limit": 1.5, "passed": True}], "passed": True}
    _print_gates({"onnx": {"scores": {"int4": {**row, "cpu_prefill_int8": {"passed": False, "error": "boom",
                                                                           "format_version": 4}},
                                      "int8": {**row, "cpu_prefill_int8": dict(row)}}}})
    text = capsys.readouterr().out
    assert "not scored" in text and text.count("cpu prefill") == 2
