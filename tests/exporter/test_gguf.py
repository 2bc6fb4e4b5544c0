"""vlmexport's own GGUF writer (``vlmexport.exporter.gguf_writer``) against llama.cpp's converter.

The converter (``convert_hf_to_gguf.py``, unmodified, from ``VLMEXPORT_LLAMA_CPP_DIR``; see
tests/models/test_llamacpp_convert.py) runs in a subprocess on the same saved tiny
checkpoint; both files are read back with the ``gguf`` package and compared tensor by
tensor (names, shapes, types, values) and key by key (names, value types, values). The
only differences allowed are the deliberate ones, each asserted by name:

1. the text GGUF holds the ``blk.N.vis_*`` visual-expert tensors (and so its
   ``general.size_label`` counts them);
2. ``v.position_embd.weight`` has its rows reordered (patches first, CLS last);
3. the mmproj has ``clip.use_gelu = true``;
4. the llava mmproj has no CLS token (the converter has no llava mmproj to compare with:
   scripts/llava_mmproj_vs_llamacpp.py compares with llama.cpp's legacy tools).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from vlmexport.core.errors import ConfigError  # noqa: E402
from vlmexport.core.preprocess import PreprocessConfig  # noqa: E402
from vlmexport.exporter import gguf_writer as gw  # noqa: E402
from vlmexport.models import VisionConfig  # noqa: E402
from vlmexport.models.checkpoint import CanonicalTensors, SafetensorsCheckpoint, save_pretrained  # noqa: E402

ENV = "VLMEXPORT_LLAMA_CPP_DIR"
OUTTYPES = ("f32", "f16", "bf16")
# hparams chosen so that no two coincide (a key read from the wrong place shows)
VISION = VisionConfig(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                      num_heads=6, layer_norm_eps=1e-5)
EXPERT_TENSORS = ("vis_attn_qkv", "vis_attn_output", "vis_gate", "vis_up", "vis_down")


def llama_cpp_dir() -> Path:
    value = os.environ.get(ENV)
    if not value:
        pytest.skip(f"set {ENV} to llama.cpp's source directory (the one holding convert_hf_to_gguf.py, e.g. "
                    "llama_cpp_python-0.3.36/vendor/llama.cpp from the llama-cpp-python sdist) to compare with "
                    "llama.cpp's converter")
    root = Path(value).expanduser()
    for candidate in (root, root / "vendor" / "llama.cpp"):
        if (candidate / "convert_hf_to_gguf.py").is_file():
            return candidate
    pytest.fail(f"{ENV}={value} does not contain convert_hf_to_gguf.py; point it at llama.cpp's source directory")


def save(tmp_path_factory, tokenizer_path, model, name: str) -> Path:
    d = tmp_path_factory.mktemp(name) / name  # the directory name becomes general.name
    return save_pretrained(model, d, tokenizer_path, PreprocessConfig(image_size=model.config.vision_config.image_size))


@pytest.fixture(scope="module")
def cogvlm_dir(tmp_path_factory, tiny_model, tokenizer_path) -> Path:
    model = tiny_model("cogvlm", seed=21, jitter=True, vision_config=VISION, rms_norm_eps=1e-6, rope_theta=5000.0)
    return save(tmp_path_factory, tokenizer_path, model, "tiny-cogvlm")


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory, tiny_model, tokenizer_path) -> Path:
    model = tiny_model("llava", seed=22, jitter=True, rms_norm_eps=1e-6)
    return save(tmp_path_factory, tokenizer_path, model, "tiny-llava")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, cogvlm_dir, llava_dir):
    """{(arch, kind, outtype): path or CompletedProcess} from llama.cpp's converter, run in parallel."""
    src = llama_cpp_dir()
    work = tmp_path_factory.mktemp("converted")
    jobs = [("cogvlm", kind, o) for kind in ("text", "mmproj") for o in OUTTYPES]
    jobs += [("llava", "text", "f16"), ("llava", "mmproj", "f16")]
    procs = {}
    for arch, kind, outtype in jobs:
        out = work / f"{arch}-{kind}-{outtype}.gguf"
        cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(cogvlm_dir if arch == "cogvlm" else llava_dir),
               "--outfile", str(out), "--outtype", outtype, *(["--mmproj"] if kind == "mmproj" else [])]
        procs[(arch, kind, outtype)] = (out, subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE,
                                                              stderr=subprocess.PIPE, text=True))
    results = {}
    for key, (out, p) in procs.items():
        _, err = p.communicate(timeout=600)
        results[key] = out if p.returncode == 0 and out.is_file() else err
    return results


def converter_file(converted, key) -> Path:
    r = converted[key]
    assert isinstance(r, Path), f"llama.cpp's converter failed for {key}:\n{r[-3000:]}"
    return r


def read(path: Path):
    reader = gguf.GGUFReader(path)
    kv = {k: (tuple(f.types), f.contents()) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    ts = {t.name: t for t in reader.tensors}
    return kv, ts


def data(t) -> np.ndarray:
    return np.asarray(t.data)


def compare(ours: Path, theirs: Path):
    """(kv differences {key: (ours, theirs)}, tensors only in ours, only in theirs, tensors that differ)."""
    (kv_a, ts_a), (kv_b, ts_b) = read(ours), read(theirs)
    kv_diff = {k: (kv_a.get(k), kv_b.get(k)) for k in set(kv_a) | set(kv_b) if kv_a.get(k) != kv_b.get(k)}
    common = set(ts_a) & set(ts_b)
    differ = sorted(n for n in common if ts_a[n].tensor_type != ts_b[n].tensor_type
                    or list(ts_a[n].shape) != list(ts_b[n].shape) or not np.array_equal(data(ts_a[n]), data(ts_b[n])))
    return kv_diff, sorted(set(ts_a) - common), sorted(set(ts_b) - common), differ, (ts_a, ts_b)


def stored(t: torch.Tensor, outtype: str, qtype) -> np.ndarray:
    """What a GGUF reader returns for ``t`` written as ``qtype``."""
    a = t.detach().float().numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return a
    if qtype == gguf.GGMLQuantizationType.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a, qtype)


# ------------------------------------------------------------ against the converter
@pytest.mark.llamacpp
@pytest.mark.parametrize("outtype", OUTTYPES)
def test_cogvlm_text_gguf_equals_converter_but_keeps_the_visual_experts(cogvlm_dir, converted, tmp_path, outtype):
    ours = gw.write_text_gguf(gw.GGUFSource.open(cogvlm_dir), tmp_path / "text.gguf", outtype)
    kv_diff, only_ours, only_theirs, differ, (ts, _) = compare(ours, converter_file(converted, ("cogvlm", "text",
                                                                                               outtype)))
    assert only_theirs == [] and differ == []
    # DELIBERATE (1): the visual experts, which the converter drops, with the checkpoint's values
    n_layers = int(read(ours)[0]["cogvlm.block_count"][1])
    assert only_ours == sorted(f"blk.{i}.{t}.weight" for i in range(n_layers) for t in EXPERT_TENSORS)
    ckpt = SafetensorsCheckpoint(cogvlm_dir)
    sources = {"vis_attn_qkv": "self_attn.vision_expert_query_key_value", "vis_attn_output": "self_attn.vision_expert_dense",
               "vis_gate": "mlp.vision_mlp.gate_proj", "vis_up": "mlp.vision_mlp.up_proj",
               "vis_down": "mlp.vision_mlp.down_proj"}
    for i in range(n_layers):
        for t, src in sources.items():
            g = ts[f"blk.{i}.{t}.weight"]
            assert g.tensor_type == gw.OUTTYPES[outtype][1]
            np.testing.assert_array_equal(data(g), stored(ckpt.get(f"model.layers.{i}.{src}.weight"), outtype,
                                                          g.tensor_type))
    # ... and, as a consequence, a size label that counts them; every other key is identical
    assert set(kv_diff) == {"general.size_label"}
    total = sum(math.prod(int(d) for d in t.shape) for t in ts.values())
    experts = sum(math.prod(int(d) for d in ts[n].shape) for n in only_ours)
    assert kv_diff["general.size_label"][0][1] == gguf.size_label(total, total, 0, 0)
    assert kv_diff["general.size_label"][1][1] == gguf.size_label(total - experts, total - experts, 0, 0)


@pytest.mark.llamacpp
@pytest.mark.parametrize("outtype", OUTTYPES)
def test_cogvlm_mmproj_gguf_equals_converter_but_for_positions_and_gelu(cogvlm_dir, converted, tmp_path, outtype):
    ours = gw.write_mmproj_gguf(gw.GGUFSource.open(cogvlm_dir), tmp_path / "mmproj.gguf", outtype)
    kv_diff, only_ours, only_theirs, differ, (ts_a, ts_b) = compare(
        ours, converter_file(converted, ("cogvlm", "mmproj", outtype)))
    assert only_ours == only_theirs == []
    # DELIBERATE (2): position rows 1..n (patches) then row 0 (CLS); same type and shape
    assert differ == ["v.position_embd.weight"]
    a, b = ts_a["v.position_embd.weight"], ts_b["v.position_embd.weight"]
    assert a.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.F32 and list(a.shape) == list(b.shape)
    np.testing.assert_array_equal(data(a), np.concatenate([data(b)[1:], data(b)[:1]]))
    assert not np.array_equal(data(a), data(b))
    # DELIBERATE (3): GELU, not llama.cpp's quick-GELU default
    assert kv_diff == {"clip.use_gelu": (((gguf.GGUFValueType.BOOL,), True), None)}


@pytest.mark.llamacpp
def test_llava_text_gguf_equals_converter(llava_dir, converted, tmp_path):
    """No deliberate difference for a plain LLaMA decoder: q/k rows are permuted to llama.cpp's
    interleaved RoPE layout exactly as the converter does, and every key matches."""
    ours = gw.write_text_gguf(gw.GGUFSource.open(llava_dir), tmp_path / "text.gguf", "f16")
    kv_diff, only_ours, only_theirs, differ, (ts, _) = compare(ours, converter_file(converted, ("llava", "text", "f16")))
    assert (kv_diff, only_ours, only_theirs, differ) == ({}, [], [], [])
    assert {"blk.0.attn_q.weight", "blk.0.attn_k.weight", "llama.attention.key_length"} <= set(ts) | set(read(ours)[0])


@pytest.mark.llamacpp
def test_converter_cannot_write_our_llava_mmproj(converted):
    """Why the llava mmproj has no converter reference: llama.cpp registers
    LlavaForConditionalGeneration's mmproj class for Pixtral / Mistral 3 only and rejects every
    other vision model_type (conversion/llava.py). If this test fails, upstream has changed:
    add a tensor-by-tensor comparison for the llava mmproj."""
    r = converted[("llava", "mmproj", "f16")]
    assert isinstance(r, str) and "Unsupported model type" in r


# ---------------------------------------------------------- without the converter
def test_llava_mmproj_layout_follows_libmtmd(llava_dir, tmp_path):
    """llama.cpp's llava graph reads v.* ViT tensors with separate q/k/v, v.pre_ln and mm.0 / mm.2;
    no v.post_ln (LLaVA reads hidden_states[-2], before any post-norm). DELIBERATE (4): no CLS
    token and no CLS position row; the feature layer is explicit and the blocks after it are not
    written (as llama.cpp's legacy llava converter does)."""
    src = gw.GGUFSource.open(llava_dir)
    path = gw.write_mmproj_gguf(src, tmp_path / "mmproj.gguf", "f32")
    kv, ts = read(path)
    assert kv["clip.projector_type"][1] == "mlp" and "clip.use_gelu" not in kv  # CLIP: quick-GELU
    assert kv["clip.vision.projection_dim"][1] == src.config.hidden_size
    n = src.specs.vision.num_layers
    assert kv[_FEATURE_KEY][1] == [n - 1] and kv["clip.vision.block_count"][1] == n - 1
    assert {f"v.blk.{n - 2}.attn_q.weight"} <= set(ts) and not [t for t in ts if t.startswith(f"v.blk.{n - 1}.")]
    ckpt = CanonicalTensors(SafetensorsCheckpoint(llava_dir), src.arch)
    expected = {"mm.0.weight": "multi_modal_projector.linear_1.weight", "mm.2.bias": "multi_modal_projector.linear_2.bias",
                "v.pre_ln.weight": "vision_tower.pre_layrnorm.weight",
                "v.blk.0.attn_k.weight": "vision_tower.encoder.layers.0.self_attn.k_proj.weight",
                "v.blk.0.ln2.bias": "vision_tower.encoder.layers.0.layer_norm2.bias",
                "v.blk.0.ffn_up.weight": "vision_tower.encoder.layers.0.mlp.fc1.weight"}
    for name, source in expected.items():
        np.testing.assert_array_equal(data(ts[name]), ckpt.get(source).numpy(), err_msg=name)
    pos = ckpt.get("vision_tower.embeddings.position_embedding.weight").numpy()
    np.testing.assert_array_equal(data(ts["v.position_embd.weight"]), pos[1:])
    assert "v.class_embd" not in ts
    assert not [n for n in ts if n.startswith("v.post_ln") or n.startswith("blk.")]


def test_llava_mmproj_with_square_vit_mlp_uses_the_legacy_ffn_names(tiny_model, tmp_path_factory, tokenizer_path,
                                                                    tmp_path):
    """intermediate == hidden: llama.cpp's up/down swap test (ffn_down input width == n_embd) fires
    on any naming, so fc1 is written as ffn_down, which llama.cpp swaps back into ffn_up."""
    model = tiny_model("llava", seed=3, vision_config=VisionConfig(image_size=32, patch_size=8, hidden_size=48,
                                                                   intermediate_size=48, num_hidden_layers=3,
                                                                   num_heads=6))
    d = save(tmp_path_factory, tokenizer_path, model, "llava-square")
    src = gw.GGUFSource.open(d)
    _, ts = read(gw.write_mmproj_gguf(src, tmp_path / "mmproj.gguf", "f32"))
    ckpt = CanonicalTensors(SafetensorsCheckpoint(d), src.arch)
    np.testing.assert_array_equal(data(ts["v.blk.0.ffn_down.weight"]),
                                  ckpt.get("vision_tower.encoder.layers.0.mlp.fc1.weight").numpy())


_FEATURE_KEY = "clip.vision.feature_layer"


class TrackingSource:
    """A tensor source that records how many bytes of tensors it handed out are alive at once.

    Each tensor is backed by a numpy array the source owns; the array lives as long as the
    tensor or any view of it (``tensor.numpy()``, ``astype(copy=False)``), so its finalizer
    marks the moment the writer really let go of the data."""

    def __init__(self, inner):
        self.inner = inner
        self.alive = self.peak = 0
        self.fetched: list[str] = []

    def keys(self):
        return self.inner.keys()

    def shape(self, name):
        return self.inner.shape(name)

    def get(self, name):
        arr = self.inner.get(name).numpy().copy()
        self.fetched.append(name)
        self.alive += arr.nbytes
        self.peak = max(self.peak, self.alive)
        weakref.finalize(arr, self._release, arr.nbytes)
        return torch.from_numpy(arr)

    def _release(self, n):
        self.alive -= n


@pytest.mark.parametrize("outtype", OUTTYPES)
def test_writer_streams_one_tensor_at_a_time(cogvlm_dir, tmp_path, outtype):
    ckpt = CanonicalTensors(SafetensorsCheckpoint(cogvlm_dir), gw.GGUFSource.open(cogvlm_dir).arch)
    src = TrackingSource(ckpt)
    out = gw.export_gguf(cogvlm_dir, tmp_path, outtype, tensors=src)
    sizes = {n: math.prod(ckpt.shape(n)) * 4 for n in ckpt.keys()}  # the checkpoint is float32
    assert src.alive == 0
    assert src.peak == max(sizes[n] for n in src.fetched)  # never two tensors at once
    assert src.peak < sum(sizes.values()) / 10
    assert len(src.fetched) == len(out.text_tensors) + len(out.mmproj_tensors)  # each read once per file
    assert sorted(set(src.fetched)) == sorted(ckpt.keys())  # and every checkpoint tensor is used


def test_export_names_files_and_notes(cogvlm_dir, tmp_path):
    out = gw.export_gguf(cogvlm_dir, tmp_path, "fp16", name="tiny")
    assert (out.text.name, out.mmproj.name) == ("tiny.f16.gguf", "mmproj-tiny.f16.gguf")
    assert out.gguf_arch == "cogvlm" and out.deviations == ()
    assert "reordered" in out.notes["v.position_embd.weight"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mmproj-tiny.f16.gguf", "tiny.f16.gguf"]
    assert read(out.text)[0]["general.file_type"][1] == gguf.LlamaFileType.MOSTLY_F16


def test_hf_cogvlm_semantics_export_with_a_warning(tiny_model, tmp_path_factory, tokenizer_path, tmp_path):
    model = tiny_model("cogvlm", seed=5, expert_routing="hf_cogvlm", position_ids="hf_cogvlm")
    d = save(tmp_path_factory, tokenizer_path, model, "hf-cogvlm")
    with pytest.warns(UserWarning, match="hf_cogvlm"):
        out = gw.export_gguf(d, tmp_path, "f32")
    assert len(out.deviations) == 2 and all("llama.cpp" in n for n in out.deviations)
    assert out.text.is_file() and out.mmproj.is_file()


def test_llava_export_records_llama_cpps_cls_handling(llava_dir, tmp_path):
    with pytest.warns(UserWarning, match="CLS"):
        out = gw.export_gguf(llava_dir, tmp_path, "f16")
    assert out.gguf_arch == "llama" and any("without CLS" in n for n in out.deviations)
    assert "CLS row dropped" in out.notes["v.position_embd.weight"]


def test_an_interrupted_export_leaves_no_file(cogvlm_dir, tmp_path):
    ckpt = CanonicalTensors(SafetensorsCheckpoint(cogvlm_dir), gw.GGUFSource.open(cogvlm_dir).arch)

    class Failing(TrackingSource):
        def get(self, name):
            if len(self.fetched) == 5:
                raise KeyboardInterrupt
            return super().get(name)

    with pytest.raises(KeyboardInterrupt):
        gw.export_gguf(cogvlm_dir, tmp_path, "f32", tensors=Failing(ckpt))
    assert list(tmp_path.iterdir()) == []


def test_bad_requests_are_clear_errors(cogvlm_dir, tiny_model, tmp_path_factory, tokenizer_path, tmp_path):
    with pytest.raises(ConfigError, match="q4_k_m.*f16"):
        gw.export_gguf(cogvlm_dir, tmp_path, "q4_k_m")
    keep_cls = tiny_model("llava", seed=1, vision_feature_select_strategy="full")
    d = save(tmp_path_factory, tokenizer_path, keep_cls, "llava-full")
    with pytest.raises(ConfigError, match="CLS"):
        gw.export_gguf(d, tmp_path, "f16")
    assert list(tmp_path.iterdir()) == []
