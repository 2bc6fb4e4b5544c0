"""Engine plan, cache key and cache logic, without TensorRT (it is not installable here).

The engine *build* is TensorRT's (``build_engine``, marked tests in test_tensorrt_backend.py);
here a plain function returning bytes stands in for it, so what is tested is ours: which
engines and profiles a bundle needs, what the key covers, that a matching cache entry is
reused, that every mismatch (TensorRT version, GPU, SM, ONNX or weights, precision,
profiles, a truncated plan, a corrupt ``engine.json``) rebuilds, and that writes are atomic.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from vlmexport.bundle import Bundle, BundleError
from vlmexport.pipeline.build import build
from vlmexport.runtimes.tensorrt_engines import (
    ENGINE_META,
    DeviceInfo,
    EngineError,
    Profile,
    cache_key,
    engine_plan,
    load_or_build,
    lookup,
)

ORIN = DeviceInfo("10.3.0", "Orin", (8, 7))


@pytest.fixture
def bundle(tiny_model_dir, tmp_path):
    out = tmp_path / "bundle"
    build(tiny_model_dir("cogvlm"), out, formats=("tensorrt",), precisions=("fp32",), reference=False,
          validate=False)
    return Bundle.open(out)


class Counting:
    """Stands in for TensorRT's builder: returns distinct bytes and counts calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, onnx_path, spec, timing_cache):
        assert onnx_path.is_file()
        self.calls.append(spec.name)
        return f"plan:{spec.name}:{len(self.calls)}".encode()


def test_plan_profiles(bundle):
    m = bundle.section("model")
    specs = {s.name: s for s in engine_plan(bundle, "fp32", max_prompt=40, max_images=3)}
    assert set(specs) == {"vision_encoder", "connector", "text_decoder.prefill", "text_decoder.decode"}
    (dec,) = specs["text_decoder.decode"].profiles
    (pre,) = specs["text_decoder.prefill"].profiles
    assert dec.name == "decode" and pre.name == "prefill"
    assert dec.shapes["inputs_embeds"] == ((1, 1, m["hidden_size"]),) * 3  # exactly one new token
    assert pre.shapes["inputs_embeds"][0][1] == 1 and pre.shapes["inputs_embeds"][2][1] == 40
    kv = pre.shapes["past_key_values.0.key"]
    assert kv[0][2] == 1 and kv[2][2] == m["max_length"]  # 1..max_ctx, never 0
    assert "token_type" in pre.shapes and "token_type" not in dec.shapes
    (img,) = specs["vision_encoder"].profiles
    assert img.shapes["pixel_values"][0][0] == 1 and img.shapes["pixel_values"][2][0] == 3
    assert specs["text_decoder.decode"].onnx.endswith(".decode.onnx")
    assert specs["text_decoder.decode"].data_sha256 == specs["text_decoder.prefill"].data_sha256  # shared weights
    with pytest.raises(BundleError, match="--precision fp16"):
        engine_plan(bundle, "fp16")


def test_profile_rejects_zero_and_disorder():
    with pytest.raises(EngineError, match="0 dimension"):
        Profile("p", {"x": ((1, 0), (1, 4), (1, 8))})
    with pytest.raises(EngineError, match="min <= opt <= max"):
        Profile("p", {"x": ((1, 8), (1, 4), (1, 8))})


def test_key_covers_every_field(bundle):
    spec = engine_plan(bundle, "fp32")[2]
    base = cache_key(spec, ORIN)["key"]
    assert cache_key(spec, ORIN)["key"] == base  # deterministic
    variants = [
        cache_key(spec, replace(ORIN, tensorrt="10.4.0")), cache_key(spec, replace(ORIN, gpu="Thor")),
        cache_key(spec, replace(ORIN, compute_capability=(8, 6))),
        cache_key(replace(spec, onnx_sha256="0" * 64), ORIN), cache_key(replace(spec, data_sha256=("1" * 64,)), ORIN),
        cache_key(replace(spec, precision="fp16"), ORIN),
        cache_key(replace(spec, profiles=engine_plan(bundle, "fp32", max_prompt=17)[2].profiles), ORIN),
        cache_key(replace(spec, settings={"workspace": 1}), ORIN),
    ]
    keys = [v["key"] for v in variants]
    assert base not in keys and len(set(keys)) == len(keys)


def test_cache_hit_miss_and_rebuild(bundle, tmp_path):
    build_fn = Counting()
    spec = engine_plan(bundle, "fp32")[0]
    cache = tmp_path / "cache"
    first = load_or_build(bundle.root, spec, ORIN, build_fn, cache_dir=cache)
    assert first.built and first.path.read_bytes() == b"plan:vision_encoder:1"
    assert first.path.parent.name.startswith("trt10.3.0-sm87-fp32-")
    again = load_or_build(bundle.root, spec, ORIN, build_fn, cache_dir=cache)
    assert not again.built and build_fn.calls == ["vision_encoder"]
    # another TensorRT: another directory, built, the old one untouched
    newer = load_or_build(bundle.root, spec, replace(ORIN, tensorrt="10.7.0"), build_fn, cache_dir=cache)
    assert newer.built and newer.path != first.path and first.path.is_file()
    # a truncated plan or an edited engine.json is stale: rebuilt, never loaded
    first.path.write_bytes(b"plan")
    assert load_or_build(bundle.root, spec, ORIN, build_fn, cache_dir=cache).built
    meta = first.path.parent / ENGINE_META
    d = json.loads(meta.read_text())
    d["tensorrt"] = "10.2.0"
    meta.write_text(json.dumps(d))
    assert not lookup(cache, spec, ORIN)[2]
    assert load_or_build(bundle.root, spec, ORIN, build_fn, cache_dir=cache).built
    meta.write_text("{not json")
    assert load_or_build(bundle.root, spec, ORIN, build_fn, cache_dir=cache).built
    assert load_or_build(bundle.root, spec, ORIN, build_fn, cache_dir=cache, force=True).built
    assert not list(cache.rglob("*.partial"))


def test_failed_build_leaves_no_entry(bundle, tmp_path):
    def boom(onnx_path, spec, timing_cache):
        raise EngineError("parser said no")

    spec = engine_plan(bundle, "fp32")[1]
    with pytest.raises(EngineError, match="parser said no"):
        load_or_build(bundle.root, spec, ORIN, boom, cache_dir=tmp_path / "c")
    assert not lookup(tmp_path / "c", spec, ORIN)[2]
    assert not [p for p in (tmp_path / "c").rglob("*") if p.is_file()]


def test_default_cache_dir_and_env(bundle, tmp_path, monkeypatch):
    build_fn = Counting()
    spec = engine_plan(bundle, "fp32")[1]
    e = load_or_build(bundle.root, spec, ORIN, build_fn)
    assert e.path.is_relative_to(bundle.root / "engines")
    monkeypatch.setenv("VLMEXPORT_ENGINE_CACHE", str(tmp_path / "shared"))
    assert load_or_build(bundle.root, spec, ORIN, build_fn).path.is_relative_to(tmp_path / "shared")
    Bundle.open(bundle.root)  # engines beside the bundle's files do not break its verification
