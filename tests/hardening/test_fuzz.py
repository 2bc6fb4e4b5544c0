"""Property-based fuzzing (hypothesis) of everything that reads untrusted input before loading:
the manifest reader, the GGUF and safetensors header readers, the prompt renderer and the
image loader.

Invariant for every generated input: the reader succeeds or raises a one-line
:class:`VlmexportError`; nothing else escapes, and allocation stays bounded (Python heap
peak per call under ``HEAP_LIMIT`` by tracemalloc, process peak RSS growth per target under
``RSS_LIMIT`` by getrusage, which also counts Pillow's and the Rust/C readers' memory).

The suite runs a fixed budget (``VLMEXPORT_FUZZ_EXAMPLES``, default 100 per target, about
a minute in all on 2 busy cores). A longer run::

    VLMEXPORT_FUZZ_EXAMPLES=20000 python -m pytest tests/hardening/test_fuzz.py -q \\
        -p no:cacheprovider --hypothesis-show-statistics
"""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmexport.core.errors import VlmexportError

CORPUS = Path(__file__).parent / "corpus"
EXAMPLES = int(os.environ.get("VLMEXPORT_FUZZ_EXAMPLES", "100"))
HEAP_LIMIT = 64 << 20  # bytes of Python heap one call may peak at
RSS_LIMIT = 512 << 20  # growth of the process's peak RSS over a whole target
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=os.environ.get("VLMEXPORT_FUZZ_RANDOM") is None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large], database=None)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB


@pytest.fixture(autouse=True)
def rss_bound():
    before = peak_rss()
    yield
    grown = peak_rss() - before
    assert grown < RSS_LIMIT, f"peak RSS grew by {grown / 1e6:.0f} MB"


def bounded(fn, *args):
    """Run ``fn``: success or a one-line VlmexportError, under the heap limit."""
    tracemalloc.start()
    try:
        result = fn(*args)
    except VlmexportError as exc:
        assert "\n" not in str(exc), str(exc)
        result = exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < HEAP_LIMIT, f"{fn.__name__} peaked at {peak / 1e6:.0f} MB of Python heap"
    return result


# ---------------------------------------------------------------------- JSON values
json_scalars = st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70) | \
    st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=4) |
                           st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=20)
BASE = json.loads((CORPUS / "manifests" / "valid.json").read_text())


def _paths(v, prefix=()):
    yield prefix
    if isinstance(v, dict):
        for k, x in v.items():
            yield from _paths(x, prefix + (k,))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from _paths(x, prefix + (i,))


PATHS = [p for p in _paths(BASE) if p]


@st.composite
def mutated_manifests(draw):
    m = json.loads(json.dumps(BASE))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        d = m
        try:
            for k in path[:-1]:
                d = d[k]
            if draw(st.booleans()) and isinstance(d, dict):
                d.pop(path[-1], None)
            else:
                d[path[-1]] = draw(json_values)
        except (KeyError, IndexError, TypeError):  # an earlier mutation changed the shape
            pass
    return m


def read_manifest(tmp: Path, data: bytes):
    from vlmexport.bundle import Bundle
    from vlmexport.bundle.schema import validate_runtime

    (tmp / "manifest.json").write_bytes(data)
    b = Bundle.open(tmp, verify="none")  # files are missing: "is missing" is a fine BundleError
    return validate_runtime(b.manifest, b.artifacts, "manifest")


@FUZZ
@given(m=mutated_manifests())
def test_fuzz_manifest_mutations(m, tmp_path):
    bounded(read_manifest, tmp_path, json.dumps(m).encode())


@FUZZ
@given(data=st.binary(max_size=2048) | json_values.map(lambda v: json.dumps(v).encode()))
def test_fuzz_manifest_bytes(data, tmp_path):
    bounded(read_manifest, tmp_path, data)


def test_manifest_schema_alone_accepts_the_valid_one():
    from vlmexport.bundle import Artifact
    from vlmexport.bundle.schema import validate_container, validate_runtime

    validate_container(BASE, "valid")
    rt = validate_runtime(BASE, [Artifact.from_dict(a) for a in BASE["artifacts"]], "valid")
    assert rt.model.max_length == 320 and rt.model.image_tokens == 66


# ---------------------------------------------------------------------- binary headers
@st.composite
def mutated_bytes(draw, good: bytes):
    data = bytearray(good)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "u64", "cut", "insert"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "u64":
            big = draw(st.sampled_from([2**31, 2**32 - 1, 2**40, 2**62, 2**64 - 1]))
            data[at:at + 8] = big.to_bytes(8, "little")
        elif kind == "cut":
            del data[at:]
        else:
            data[at:at] = draw(st.binary(max_size=16))
    return bytes(data)


GGUF = (CORPUS / "gguf" / "valid.gguf").read_bytes()
SAFETENSORS = (CORPUS / "safetensors" / "valid.safetensors").read_bytes()


@pytest.mark.llamacpp
@FUZZ
@given(data=mutated_bytes(GGUF))
def test_fuzz_gguf_header(data, tmp_path):
    pytest.importorskip("gguf")
    from vlmexport.runtimes.llamacpp_backend import read_gguf_info

    p = tmp_path / "f.gguf"
    p.write_bytes(data)
    bounded(read_gguf_info, p)


@FUZZ
@given(data=mutated_bytes(SAFETENSORS))
def test_fuzz_safetensors_header(data, tmp_path):
    from vlmexport.models.checkpoint import SafetensorsCheckpoint

    d = tmp_path / "ckpt"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    (d / "model.safetensors").write_bytes(data)
    bounded(SafetensorsCheckpoint, d)
    pytest.importorskip("onnxruntime")
    from vlmexport.runtimes.onnxruntime_backend import read_embedding_table

    bounded(read_embedding_table, d / "model.safetensors")


# ---------------------------------------------------------------------- prompt renderer
templates = st.fixed_dictionaries({
    "user": st.sampled_from(["Question: {content} Answer:", "{content}", "<image>{content}", "USER: {content}\n"]),
    "assistant": st.sampled_from([" {content}", "{content}</s>"]),
    "turn_separator": st.text(max_size=3), "add_bos": st.booleans(), "eos_after_answer": st.booleans(),
    "unplaced_images": st.sampled_from(["start", "error"]),
    "image_token": st.sampled_from(["<image>", "<img>", "[IMG]"]),
})
prompt_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=80) | \
    st.lists(st.sampled_from(["<image>", "<img>", "{", "}", "{content}", " ", "a", "\x00", "é", "\n"]),
             max_size=12).map("".join)


@FUZZ
@given(t=templates, texts=st.lists(st.tuples(prompt_text, st.integers(0, 3)), min_size=0, max_size=3),
       image_tokens=st.integers(1, 70))
def test_fuzz_prompt_renderer(tokenizer, t, texts, image_tokens):
    """Through the public API only: the template is checked by the manifest schema, the text by
    the pipeline's argument checks, then render() must succeed or raise a PromptError."""
    from vlmexport.bundle.schema import ChatTemplateSection
    from vlmexport.core.prompt import ChatTemplate, Turn, render
    from vlmexport.runtimes.arguments import check_text

    def run():
        ChatTemplateSection.model_validate(t)
        turns = [Turn(user=check_text(x), images=n) for x, n in texts]
        return render(ChatTemplate.from_dict(t), turns, tokenizer, image_tokens)

    out = bounded(run)
    if not isinstance(out, VlmexportError):  # every image placed, lengths add up, ids in the vocabulary
        images = [p for p in out.pieces if not hasattr(p, "ids")]
        assert len(images) == sum(n for _, n in texts) and all(p.length == image_tokens for p in images)
        assert out.length == sum(len(p.ids) if hasattr(p, "ids") else p.length for p in out.pieces)
        assert all(0 <= i < tokenizer.vocab_size for p in out.pieces if hasattr(p, "ids") for i in p.ids)


@FUZZ
@given(text=st.text(max_size=40))
def test_fuzz_prompt_text_check(text):
    """Any str, lone surrogates included (what surrogateescape makes of invalid UTF-8 argv)."""
    from vlmexport.runtimes.arguments import check_text

    out = bounded(check_text, text)
    if not isinstance(out, VlmexportError):
        out.encode("utf-8")


# ---------------------------------------------------------------------- image loader
IMAGE_SEEDS = [p.read_bytes() for p in sorted((CORPUS / "images").iterdir()) if p.stat().st_size < 4096]


@st.composite
def image_bytes(draw):
    if draw(st.booleans()):
        return draw(mutated_bytes(draw(st.sampled_from(IMAGE_SEEDS))))
    magic = draw(st.sampled_from([b"\x89PNG\r\n\x1a\n", b"GIF89a", b"\xff\xd8\xff", b"RIFF", b"II*\x00", b"BM", b""]))
    return magic + draw(st.binary(max_size=256))


@pytest.fixture
def small_images(monkeypatch):
    """A 1M-pixel decompression-bomb limit while fuzzing (same code path, faster: a mutated header
    may claim any size up to the limit, which Pillow then decodes from the truncated data)."""
    import vlmexport.core.preprocess as pp

    monkeypatch.setattr(pp, "MAX_IMAGE_PIXELS", 1_000_000)


@FUZZ
@given(data=image_bytes())
def test_fuzz_image_bytes(small_images, data):
    from vlmexport.core.preprocess import open_image

    out = bounded(open_image, data)
    if not isinstance(out, VlmexportError):
        assert out.mode == "RGB" and min(out.size) >= 2


dtypes = st.sampled_from([np.uint8, np.uint16, np.int32, np.float32, np.float64, np.bool_])


@FUZZ
@given(shape=st.lists(st.integers(0, 6), min_size=0, max_size=4), dtype=dtypes)
def test_fuzz_image_arrays(shape, dtype):
    from vlmexport.core.preprocess import open_image

    out = bounded(open_image, np.ones(shape, dtype))
    if not isinstance(out, VlmexportError):
        assert out.mode == "RGB"


@FUZZ
@given(obj=json_values | st.builds(object) | st.just(io.BytesIO(b"x")))
def test_fuzz_image_wrong_types(obj):
    from vlmexport.core.preprocess import open_image

    if isinstance(obj, str):
        obj = "/nonexistent/" + obj.replace("\x00", "")
    bounded(open_image, obj)
