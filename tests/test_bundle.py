"""The bundle format: atomic writes, manifest round trip, verification and the model card."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import vlmexport.bundle.format as bundle_mod
from vlmexport.bundle import (SCHEMA_VERSION, Artifact, Bundle, BundleError, BundleWriter, TensorSpec,
                              format_inspection, inspect_bundle)
from vlmexport.core.errors import VlmexportError
from vlmexport.bundle.card import render_model_card

CONTENT = {
    "tokenizer.model": b"sentencepiece model bytes",
    "preprocessor_config.json": b'{"image_size": 32}\n',
    "onnx/vision_encoder.fp32.onnx": bytes(range(256)) * 4,
    "onnx/text_decoder.fp16.onnx": b"graph" * 10,
    "onnx/text_decoder.fp16.onnx.data": b"\x01\x02" * 3000,
}
VISION_IN = TensorSpec("pixel_values", "float32", ("batch", 3, 32, 32))
VISION_OUT = TensorSpec("image_embeds", "float32", ("batch", 18, 64))
DECODER_IN = [TensorSpec("inputs_embeds", "float16", ("batch", "sequence", 64)),
              TensorSpec("token_type_ids", "int64", ("batch", "sequence")),
              TensorSpec("past_key", "float16", ("batch", 2, "past_sequence", 32))]
DECODER_OUT = [TensorSpec("logits", "float32", ("batch", "sequence", 320))]
VALIDATION = {
    "parts": [
        {"part": "vision_encoder", "precision": "fp32", "check": "image_embeds", "max_abs_diff": 3.1e-6,
         "tolerance": 1e-4, "passed": True},
        {"part": "text_decoder", "precision": "fp16", "check": "logits", "max_abs_diff": 0.0042,
         "tolerance": 0.01, "passed": True},
    ],
    "end_to_end": [{"precision": "fp16", "prompts": 20, "identical": 19, "rate": 0.95}],
}
MODEL = {"arch": "cogvlm", "params": 1_234_567,
         "config": {"hidden_size": 64, "vision_config": {"image_size": 32},
                    "expert_routing": "image_chunk", "position_ids": "sequential"}}


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def write_bundle(out: Path, content: dict[str, bytes] = CONTENT, deviation: str | None = None) -> Path:
    with BundleWriter(out) as w:
        for rel, data in content.items():
            w.path(rel).write_bytes(data)
        w.add_artifact("vision_encoder", "onnx", "fp32", "onnx/vision_encoder.fp32.onnx",
                       inputs=[VISION_IN], outputs=[VISION_OUT], extra={"opset": 17})
        w.add_artifact("text_decoder", "onnx", "fp16", "onnx/text_decoder.fp16.onnx",
                       inputs=DECODER_IN, outputs=DECODER_OUT, data_files=["onnx/text_decoder.fp16.onnx.data"])
        w.set_section("model", MODEL)
        w.set_section("tokenizer", {"file": "tokenizer.model", "vocab_size": 320})
        w.set_section("validation", VALIDATION)
        if deviation:
            w.add_semantics_deviation(deviation)
    return out


@pytest.fixture
def bundle_dir(tmp_path) -> Path:
    return write_bundle(tmp_path / "bundle")


def edit_manifest(root: Path, fn) -> None:
    m = json.loads((root / "manifest.json").read_text())
    fn(m)
    (root / "manifest.json").write_text(json.dumps(m))


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------ round trip
def test_round_trip(bundle_dir):
    b = Bundle.open(bundle_dir)
    assert b.root == bundle_dir and b.schema_version == SCHEMA_VERSION == 1
    vision = Artifact(part="vision_encoder", format="onnx", precision="fp32", file="onnx/vision_encoder.fp32.onnx",
                      sha256=sha(CONTENT["onnx/vision_encoder.fp32.onnx"]), size_bytes=1024,
                      inputs=(VISION_IN,), outputs=(VISION_OUT,), extra={"opset": 17})
    data = CONTENT["onnx/text_decoder.fp16.onnx.data"]
    decoder = Artifact(part="text_decoder", format="onnx", precision="fp16", file="onnx/text_decoder.fp16.onnx",
                       sha256=sha(CONTENT["onnx/text_decoder.fp16.onnx"]), size_bytes=50,
                       data_files=({"file": "onnx/text_decoder.fp16.onnx.data", "sha256": sha(data),
                                    "size_bytes": len(data)},),
                       inputs=tuple(DECODER_IN), outputs=tuple(DECODER_OUT))
    assert b.artifacts == [vision, decoder]
    assert decoder.total_size_bytes == 50 + 6000
    assert b.find("text_decoder").inputs[2].dynamic_axes == {0: "batch", 2: "past_sequence"}
    assert b.section("model") == MODEL and b.section("validation") == VALIDATION
    assert b.section("tokenizer")["vocab_size"] == 320
    assert b.section("calibration") is None and b.section("calibration", {}) == {}
    assert b.semantics_deviations == []
    tools = b.section("tool_versions")
    assert tools["python"] and tools["vlmexport"] and tools["numpy"] == np.__version__
    assert b.file("tokenizer.model").read_bytes() == CONTENT["tokenizer.model"]
    # Artifact / TensorSpec JSON round trip
    assert Artifact.from_dict(json.loads(json.dumps(decoder.to_dict()))) == decoder


def test_files_map_covers_every_file_but_the_manifest(bundle_dir):
    m = Bundle.open(bundle_dir).manifest
    on_disk = {p.relative_to(bundle_dir).as_posix(): p.read_bytes() for p in bundle_dir.rglob("*") if p.is_file()}
    assert set(on_disk) == set(CONTENT) | {"README.md", "manifest.json"}
    assert set(m["files"]) == set(on_disk) - {"manifest.json"}
    for rel, digest in m["files"].items():
        assert digest == sha(on_disk[rel]) and m["file_sizes"][rel] == len(on_disk[rel])


def test_sections_are_normalized_to_json(tmp_path):
    with BundleWriter(tmp_path / "b") as w:
        w.set_section("benchmarks", {"tokens_per_s": np.float32(12.5), "shape": (1, 2), "ids": np.arange(3)})
        w.set_section("tool_versions", {"tensorrt": "10.3.0"})
        with pytest.raises(BundleError, match="unknown manifest section 'benchmark'"):
            w.set_section("benchmark", {})
        with pytest.raises(BundleError, match="cannot be stored as JSON"):
            w.set_section("calibration", {"x": object()})
    b = Bundle.open(tmp_path / "b")
    assert b.section("benchmarks") == {"tokens_per_s": 12.5, "shape": [1, 2], "ids": [0, 1, 2]}
    assert b.section("tool_versions")["tensorrt"] == "10.3.0" and "python" in b.section("tool_versions")


# ------------------------------------------------------------------------ atomic writes
@pytest.mark.parametrize("exc", [RuntimeError("export failed"), KeyboardInterrupt()])
@pytest.mark.parametrize("older", [False, True])
def test_interrupted_write_leaves_nothing_and_keeps_the_old_bundle(tmp_path, exc, older):
    out = tmp_path / "bundle"
    if older:
        write_bundle(out)
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(type(exc)):
        with BundleWriter(out) as w:
            w.path("onnx/vision_encoder.fp32.onnx").write_bytes(b"half written")
            w.add_artifact("vision_encoder", "onnx", "fp32", "onnx/vision_encoder.fp32.onnx")
            raise exc
    assert leftovers(tmp_path) == []
    if older:
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
        Bundle.open(out)
    else:
        assert not out.exists()


def test_failure_while_finalizing_leaves_nothing(tmp_path):
    out = tmp_path / "bundle"
    with pytest.raises(BundleError, match="onnx/missing.onnx was never written"):
        with BundleWriter(out) as w:
            w.add_artifact("connector", "onnx", "fp32", "onnx/missing.onnx")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_only_at_the_end(tmp_path):
    out = write_bundle(tmp_path / "bundle")
    new = {"tokenizer.model": b"new tokenizer", "gguf/text.q8_0.gguf": b"GGUF" * 8}
    with BundleWriter(out) as w:
        for rel, data in new.items():
            w.path(rel).write_bytes(data)
        w.add_artifact("text_decoder", "gguf", "q8_0", "gguf/text.q8_0.gguf")
        # while writing, the old bundle is still complete and the new one invisible
        assert Bundle.open(out).find("vision_encoder").precision == "fp32"
        assert w.root != out and not (out / "gguf").exists()
    b = Bundle.open(out)
    assert [a.key for a in b.artifacts] == ["text_decoder gguf q8_0"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(
        [*new, "README.md", "manifest.json"])
    assert leftovers(tmp_path) == []


def test_refuses_to_replace_a_directory_that_is_not_a_bundle(tmp_path):
    out = tmp_path / "models"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(BundleError, match="is not a vlmexport bundle; choose another output path"):
        with BundleWriter(out):
            pass
    assert (out / "precious.txt").read_text() == "keep me" and leftovers(tmp_path) == []


def test_add_file_copies(tmp_path):
    src = tmp_path / "spm.model"
    src.write_bytes(b"spm")
    with BundleWriter(tmp_path / "b") as w:
        assert w.add_file("tokenizer.model", src) == w.root / "tokenizer.model"
        with pytest.raises(BundleError, match="it is not a file"):
            w.add_file("x", tmp_path / "missing")
    assert Bundle.open(tmp_path / "b").files == {"tokenizer.model": sha(b"spm"),
                                                "README.md": sha((tmp_path / "b/README.md").read_bytes())}


def test_writer_refuses_unsafe_paths_and_duplicates(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    with pytest.raises(BundleError, match="a symlink"):
        with BundleWriter(tmp_path / "b") as w:
            for bad in ("../x", "/etc/passwd", "a/../../x", ""):
                with pytest.raises(BundleError, match="escapes the bundle|not a relative file name"):
                    w.path(bad)
            for reserved in ("manifest.json", "README.md"):
                with pytest.raises(BundleError, match="written by the bundle writer itself"):
                    w.path(reserved)
            w.path("a.onnx").write_bytes(b"a")
            w.add_artifact("connector", "onnx", "fp32", "./a.onnx")
            with pytest.raises(BundleError, match="added twice"):
                w.add_artifact("connector", "onnx", "fp32", "a.onnx")
            with pytest.raises(BundleError, match="dtype 'float8'"):
                TensorSpec("x", "float8", (1,))
            (w.root / "link").symlink_to(outside)  # caught when the block ends
    assert not (tmp_path / "b").exists()


# ------------------------------------------------------------------------ open errors
def test_tampered_byte_fails_sha256(bundle_dir):
    p = bundle_dir / "onnx/vision_encoder.fp32.onnx"
    data = bytearray(p.read_bytes())
    data[100] ^= 1
    p.write_bytes(bytes(data))
    Bundle.open(bundle_dir, verify="size")  # same size: only the hash notices
    with pytest.raises(BundleError, match=r"vision_encoder\.fp32\.onnx is truncated or was modified "
                                          r"\(sha256 mismatch\); rebuild the bundle"):
        Bundle.open(bundle_dir)


def test_tampered_readme_and_config_fail_sha256(bundle_dir):
    for rel in ("README.md", "preprocessor_config.json"):
        p = bundle_dir / rel
        original = p.read_bytes()
        p.write_bytes(original.upper()[: len(original)])
        with pytest.raises(BundleError, match=f"{rel} is truncated or was modified"):
            Bundle.open(bundle_dir)
        p.write_bytes(original)
    Bundle.open(bundle_dir)


def test_truncated_file_fails_size_check(bundle_dir):
    p = bundle_dir / "onnx/text_decoder.fp16.onnx.data"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(BundleError, match=r"fp16\.onnx\.data is truncated or was modified \(5990 bytes, "
                                          r"the manifest says 6000\)"):
        Bundle.open(bundle_dir, verify="size")


def test_missing_file(bundle_dir):
    (bundle_dir / "tokenizer.model").unlink()
    with pytest.raises(BundleError, match="tokenizer.model is missing"):
        Bundle.open(bundle_dir, verify="none")


@pytest.mark.parametrize("where", ["artifact", "data_file", "files"])
@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "onnx/../../x", "onnx/../tokenizer.model", "C:\\x"])
def test_manifest_paths_that_escape(bundle_dir, where, path):
    def tamper(m):
        if where == "artifact":
            m["artifacts"][0]["file"] = path
        elif where == "data_file":
            m["artifacts"][1]["data_files"][0]["file"] = path
        else:
            m["files"][path] = "0" * 64
    edit_manifest(bundle_dir, tamper)
    with pytest.raises(BundleError, match="escapes the bundle"):
        Bundle.open(bundle_dir, verify="none")


def test_symlink_pointing_outside_escapes(bundle_dir, tmp_path):
    # same bytes as the real file: only the path check can catch it
    outside = tmp_path / "elsewhere.model"
    outside.write_bytes(CONTENT["tokenizer.model"])
    (bundle_dir / "tokenizer.model").unlink()
    (bundle_dir / "tokenizer.model").symlink_to(outside)
    with pytest.raises(BundleError, match="'tokenizer.model' resolves outside the bundle"):
        Bundle.open(bundle_dir)


def test_file_refuses_paths_outside(bundle_dir, tmp_path):
    b = Bundle.open(bundle_dir)
    (bundle_dir / "link").symlink_to(tmp_path)
    for bad in ("../outside", "/etc/passwd", "link/outside.txt"):
        with pytest.raises(BundleError, match="escapes the bundle"):
            b.file(bad)


def test_newer_schema(bundle_dir):
    edit_manifest(bundle_dir, lambda m: m.update(schema_version=999))
    with pytest.raises(BundleError, match=r"written by a newer vlmexport \(schema 999.*upgrade vlmexport"):
        Bundle.open(bundle_dir)


@pytest.mark.parametrize("version", [0, "1", None, True])
def test_unknown_schema(bundle_dir, version):
    edit_manifest(bundle_dir, lambda m: m.update(schema_version=version))
    with pytest.raises(BundleError, match="unknown schema_version"):
        Bundle.open(bundle_dir)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match=r"is not a vlmexport bundle \(no manifest.json\); build one with "
                                          r"`vlmexport build`"):
        Bundle.open(tmp_path)
    with pytest.raises(BundleError, match=r"is not a vlmexport bundle \(not a directory\)"):
        Bundle.open(tmp_path / "nope")
    (tmp_path / "manifest.json").write_text('{"name": "some other tool"}')
    with pytest.raises(BundleError, match="is not a vlmexport manifest"):
        Bundle.open(tmp_path)


def test_invalid_json(bundle_dir):
    (bundle_dir / "manifest.json").write_text('{"kind": "vlmexport-bundle", ')
    with pytest.raises(BundleError, match=r"manifest.json is not valid JSON \(.*line 1.*\); rebuild") as info:
        Bundle.open(bundle_dir)
    assert isinstance(info.value, VlmexportError) and "\n" not in str(info.value)


def test_malformed_artifact(bundle_dir):
    edit_manifest(bundle_dir, lambda m: m["artifacts"][1].pop("precision"))
    with pytest.raises(BundleError, match="artifact 2 is malformed"):
        Bundle.open(bundle_dir)


def test_verify_none_and_size_skip_hashing(bundle_dir, monkeypatch):
    calls = []
    real = bundle_mod.file_sha256
    monkeypatch.setattr(bundle_mod, "file_sha256", lambda p: calls.append(p) or real(p))
    Bundle.open(bundle_dir, verify="none")
    Bundle.open(bundle_dir, verify="size")
    assert calls == []
    Bundle.open(bundle_dir, verify="full")
    assert len(calls) == len(CONTENT) + 1  # + README.md
    p = bundle_dir / "onnx/vision_encoder.fp32.onnx"
    p.write_bytes(b"different length")
    assert Bundle.open(bundle_dir, verify="none").find("vision_encoder").size_bytes == 1024
    with pytest.raises(BundleError, match="verify='fast' is not one of"):
        Bundle.open(bundle_dir, verify="fast")


def test_hash_is_streamed_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(bundle_mod, "HASH_CHUNK", 7)
    data = os.urandom(1000)
    (tmp_path / "f").write_bytes(data)
    assert bundle_mod.file_sha256(tmp_path / "f") == sha(data)


# ------------------------------------------------------------------------ queries
def test_find_lists_what_exists(bundle_dir):
    b = Bundle.open(bundle_dir)
    assert b.find("text_decoder", "onnx", "fp16").file == "onnx/text_decoder.fp16.onnx"
    assert b.precisions("text_decoder", "onnx") == ["fp16"] and b.precisions("text_decoder", "gguf") == []
    with pytest.raises(BundleError, match=r"has no artifact with part=text_decoder format=onnx precision=int4; "
                                          r"it holds: vision_encoder onnx fp32, text_decoder onnx fp16"):
        b.find("text_decoder", "onnx", "int4")
    with pytest.raises(BundleError, match="has no artifact with part=connector"):
        b.find("connector")


def test_find_ambiguous(tmp_path):
    with BundleWriter(tmp_path / "b") as w:
        for prec in ("fp32", "int8"):
            w.path(f"onnx/connector.{prec}.onnx").write_bytes(prec.encode())
            w.add_artifact("connector", "onnx", prec, f"onnx/connector.{prec}.onnx")
    b = Bundle.open(tmp_path / "b")
    assert b.precisions("connector", "onnx") == ["fp32", "int8"]
    with pytest.raises(BundleError, match=r"several artifacts .*connector onnx fp32, connector onnx int8"):
        b.find("connector", "onnx")


# ------------------------------------------------------------------------ model card
def test_readme_has_the_validation_table(tmp_path):
    out = write_bundle(tmp_path / "b", deviation="gguf q4_k_m: llama.cpp cannot reproduce hf_cogvlm positions")
    readme = (out / "README.md").read_text()
    assert readme == render_model_card(Bundle.open(out).manifest)
    assert "| vision_encoder | fp32 | image_embeds | 3.10e-06 | 1.00e-04 | pass |" in readme
    assert "| text_decoder | fp16 | logits | 0.0042 | 0.01 | pass |" in readme
    assert "| fp16 | 20 | 19 | 0.95 |" in readme
    assert "**All 2 checks passed.**" in readme
    assert "| text_decoder | onnx | fp16 | 0.006 | `onnx/text_decoder.fp16.onnx` + " in readme
    assert "> - gguf q4_k_m: llama.cpp cannot reproduce hf_cogvlm positions" in readme
    assert "Parameters | 1.2M" in readme and "32x32 px" in readme and "`image_chunk`" in readme
    assert 'vlmexport run BUNDLE --image' in readme and 'vlmexport.load("BUNDLE")' in readme


def test_card_renders_failures_and_new_sections_generically():
    manifest = {"schema_version": 1, "model": {"arch": "llava"}, "artifacts": [],
                "validation": [{"part": "connector", "precision": "int8", "check": "embeds",
                                "max_abs_diff": 0.5, "tolerance": 0.1, "passed": False}],
                "calibration": {"samples": 64, "per_path": {"image": {"max": 3.5}, "text": {"max": 9.0}}},
                "benchmarks": [{"backend": "onnxruntime", "precision": "fp16", "tokens_per_s": 41.2}]}
    card = render_model_card(manifest)
    assert "**1 of 1 checks FAILED.**" in card and "| 0.5 | 0.1 | **FAIL** |" in card
    assert "## Calibration" in card and "| samples | 64 |" in card and "| image | 3.5 |" in card
    assert "| onnxruntime | fp16 | 41.2 |" in card


# ------------------------------------------------------------------------ inspection
def test_inspect_bundle(bundle_dir):
    s = inspect_bundle(bundle_dir)
    assert s["model"]["arch"] == "cogvlm" and s["model"]["expert_routing"] == "image_chunk"
    assert s["validation"]["checks"] == 2 and s["validation"]["passed"] == 2
    assert s["total_size_bytes"] == sum(p.stat().st_size for p in bundle_dir.rglob("*")
                                        if p.is_file() and p.name != "manifest.json")
    assert s["artifacts"][1]["size_bytes"] == 6050
    text = format_inspection(s)
    assert "past_key" in text and "float16" in text and "[batch, 2, past_sequence, 32]" in text
    assert "2/2 checks passed" in text and "expert_routing=image_chunk" in text


# ------------------------------------------------------------------------ dependencies
def test_bundle_module_needs_no_torch(tmp_path):
    code = (
        "import sys, vlmexport.bundle as b\n"
        "bad = {'torch', 'vlmexport.models', 'vlmexport.training', 'vlmexport.exporter'} & set(sys.modules)\n"
        "assert not bad, bad\n"
        f"with b.BundleWriter({str(tmp_path / 'b')!r}) as w:\n"
        "    w.path('x.onnx').write_bytes(b'x')\n"
        "    w.add_artifact('connector', 'onnx', 'fp32', 'x.onnx')\n"
        f"b.inspect_bundle({str(tmp_path / 'b')!r})\n"
        "bad = {'torch', 'vlmexport.models', 'vlmexport.training', 'rich', 'typer'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
