"""The corpus of bad and unusual inputs (tests/hardening/corpus, made by make_corpus.py):
every file gives its expected result, or its expected one-line VlmexportError."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from vlmexport.bundle.schema import read_manifest_json, validate_container, validate_runtime
from vlmexport.core.errors import VlmexportError
from vlmexport.core.preprocess import open_image

CORPUS = Path(__file__).parent / "corpus"
EXPECTED = json.loads((CORPUS / "expected.json").read_text())


def cases(kind: str) -> list[str]:
    return sorted(k for k in EXPECTED if k.startswith(kind + "/"))


def test_every_corpus_file_has_an_expectation():
    on_disk = {p.relative_to(CORPUS).as_posix() for p in CORPUS.rglob("*") if p.is_file()} - {"expected.json"}
    assert on_disk == set(EXPECTED)
    assert sum((CORPUS / k).stat().st_size for k in EXPECTED) < 1_000_000


def check_error(fn, expected: dict) -> None:
    if "error" not in expected:
        fn()
        return
    with pytest.raises(VlmexportError) as info:
        fn()
    msg = str(info.value)
    assert expected["error"] in msg and "\n" not in msg, msg


@pytest.mark.parametrize("rel", cases("images"))
def test_image(rel):
    e = EXPECTED[rel]
    check_error(lambda: open_image(CORPUS / rel), e)
    if "pixel" in e:
        img = open_image(CORPUS / rel)
        assert img.mode == "RGB" and list(img.size) == e["size"]
        x, y, rgb = e["pixel"]
        got = np.asarray(img)[y, x].astype(int)
        tol = 6 if rel.endswith((".jpg", ".webp")) else 1
        assert np.abs(got - rgb).max() <= tol, (rel, got.tolist(), rgb)
        # the same bytes give the same pixels
        assert np.array_equal(np.asarray(open_image((CORPUS / rel).read_bytes())), np.asarray(img))


def _manifest(rel: str):
    m = read_manifest_json(CORPUS / rel)
    from vlmexport.bundle import KIND, Artifact, BundleError
    from vlmexport.bundle.format import _check_schema

    if not isinstance(m, dict) or m.get("kind") != KIND:
        raise BundleError(f"{rel} is not a vlmexport manifest; build a bundle with `vlmexport build`")
    _check_schema(m.get("schema_version"), Path(rel))
    validate_container(m, rel)
    validate_runtime(m, [Artifact.from_dict(a) for a in m["artifacts"]], rel)


@pytest.mark.parametrize("rel", cases("manifests"))
def test_manifest(rel):
    check_error(lambda: _manifest(rel), EXPECTED[rel])


@pytest.mark.parametrize("rel", cases("manifests"))
def test_manifest_through_bundle_open(rel, tmp_path):
    """The same files as a bundle's manifest.json: Bundle.open (container) + the loader's check."""
    from vlmexport.bundle import Bundle

    shutil.copy(CORPUS / rel, tmp_path / "manifest.json")
    e = EXPECTED[rel]
    with pytest.raises(VlmexportError) as info:  # the valid one lacks its files: "is missing"
        b = Bundle.open(tmp_path, verify="none")
        validate_runtime(b.manifest, b.artifacts, str(tmp_path))
    msg = str(info.value)
    assert "\n" not in msg
    if "error" in e and "model" not in rel and "tokenizer" not in rel:
        assert e["error"] in msg or "is missing" in msg, msg


@pytest.mark.llamacpp
@pytest.mark.parametrize("rel", cases("gguf"))
def test_gguf_header(rel):
    pytest.importorskip("gguf")
    from vlmexport.runtimes.llamacpp_backend import read_gguf_info

    check_error(lambda: read_gguf_info(CORPUS / rel), EXPECTED[rel])


@pytest.mark.parametrize("rel", cases("safetensors"))
def test_safetensors_header(rel, tmp_path):
    from vlmexport.models.checkpoint import SafetensorsCheckpoint

    shutil.copy(CORPUS / rel, tmp_path / "model.safetensors")
    check_error(lambda: SafetensorsCheckpoint(tmp_path), EXPECTED[rel])


@pytest.mark.parametrize("rel", cases("safetensors"))
def test_embedding_table_reader(rel):
    """The onnxruntime backend's token-embedding table reader (a bundle read with verify='none')."""
    pytest.importorskip("onnxruntime")
    from vlmexport.runtimes.onnxruntime_backend import read_embedding_table

    e = EXPECTED[rel]
    if "error" in e:
        with pytest.raises(VlmexportError) as info:
            read_embedding_table(CORPUS / rel)
        assert "\n" not in str(info.value)
    else:
        assert read_embedding_table(CORPUS / rel).shape == (4, 8)
