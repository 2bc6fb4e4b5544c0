"""Quantized GGUF files (quant/gguf.py) and the multimodal importance matrix
(quant/imatrix.py).

The quantization tests use a tiny cogvlm whose rows are whole K-quant super-blocks
(hidden 256, intermediate 512) and 8 layers, so that llama.cpp's q4_k_m mixture really
bumps some layers (``use_more_bits``) instead of falling back for odd shapes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from vlmexport.core.errors import ConfigError  # noqa: E402
from vlmexport.core.preprocess import PreprocessConfig  # noqa: E402
from vlmexport.exporter import gguf_writer as gw  # noqa: E402
from vlmexport.quant import imatrix as gi  # noqa: E402
from vlmexport.quant import gguf_quantize as gq  # noqa: E402
from vlmexport.runtimes import llamacpp_backend as lb  # noqa: E402

BIG = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4)
N_CTX = 256


def llama_cpp_or_skip():
    if not lb.llamacpp_available():
        pytest.skip("llama-cpp-python is not installed (pip install 'vlmexport[llamacpp]')")


def save(model, tmp_path_factory, tokenizer_path, name):
    from vlmexport.models.checkpoint import save_pretrained

    d = tmp_path_factory.mktemp(name) / name
    return save_pretrained(model, d, tokenizer_path, PreprocessConfig(image_size=model.config.vision_config.image_size))


@pytest.fixture(scope="module", autouse=True)
def no_amx_repacking():
    """No AMX repacking probe per test file: results do not depend on it (the probe has its own test)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(lb.EXTRA_BUFTS_ENV, "0")
        yield


@pytest.fixture(scope="module")
def quant_model(tiny_model, tmp_path_factory, tokenizer_path):
    """(torch model, model dir, f16 GGUFExport, Imatrix) of a K-quant-shaped tiny cogvlm."""
    llama_cpp_or_skip()
    model = tiny_model("cogvlm", seed=31, jitter=True, **BIG)
    d = save(model, tmp_path_factory, tokenizer_path, "quant-cogvlm")
    e = gw.export_gguf(d, d / "gguf", "f16")
    from vlmexport.models.checkpoint import load_pretrained

    loaded = load_pretrained(d, dtype=torch.float32)
    items = gi.synthetic_items(32, 7)
    plan = gw.plan_text(gw.GGUFSource.open(d), "f16")
    runs = gi.calibration_runs(loaded.model, loaded.tokenizer, PreprocessConfig(image_size=32),
                               type(loaded.model).default_chat_template(), items)
    im = gi.compute_imatrix(loaded.model, plan, runs, dataset="synthetic-vqa:val:7")
    return model, d, e, im


@pytest.fixture(scope="module")
def quantized(quant_model, tmp_path_factory):
    """{(qtype, with imatrix): QuantizeResult}"""
    _, _, e, im = quant_model
    out = tmp_path_factory.mktemp("quantized")
    res = {}
    for q in ("q8_0", "q4_k_m", "q4_0"):
        for use_im in (False, True):
            res[q, use_im] = gq.quantize_text_gguf(e.text, out / f"model.{q}.{int(use_im)}.gguf", q,
                                                    imatrix=im.means() if use_im else None, nthread=1)
    return res


# ------------------------------------------------------------------------ types
@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", ["q8_0", "q4_k_m", "q4_0"])
@pytest.mark.parametrize("use_im", [False, True])
def test_visual_experts_get_their_language_twins_types(quantized, qtype, use_im):
    r = quantized[qtype, use_im]
    types = gq.tensor_types(r.path)
    assert types == r.types
    assert gq.expert_type_mismatches(types) == []
    vis = [n for n in types if ".vis_" in n]
    assert len(vis) == 5 * BIG["num_hidden_layers"]
    base = {"q8_0": "Q8_0", "q4_k_m": "Q4_K", "q4_0": "Q4_0"}[qtype]
    assert types["blk.3.vis_gate.weight"] == types["blk.3.ffn_gate.weight"] == base
    assert all(types[n] == "F32" for n in types if n.endswith("_norm.weight"))


@pytest.mark.llamacpp
def test_q4_k_m_bumps_reach_the_visual_ffn_down(quantized):
    """llama.cpp bumps ffn_down by name (use_more_bits layers -> Q6_K); vis_down has no
    ``ffn_`` in its name, so without pinning it stays Q4_K: llama.cpp's plan shows that."""
    r = quantized["q4_k_m", False]
    downs = [r.types[f"blk.{i}.ffn_down.weight"] for i in range(BIG["num_hidden_layers"])]
    assert "Q6_K" in downs and "Q4_K" in downs  # the mixture really mixes on this model
    assert [r.types[f"blk.{i}.vis_down.weight"] for i in range(BIG["num_hidden_layers"])] == downs
    assert any(m.startswith("blk.") and ".vis_down." in m for m in r.mismatched_first_pass)
    assert r.pinned > 0


@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype,use_im", [("q4_k_m", False), ("q4_0", True)])
def test_dry_run_plan_is_what_an_unpinned_quantize_writes(quant_model, tmp_path, qtype, use_im):
    """The single pass relies on llama.cpp's dry-run plan: it must equal the types a plain
    (unpinned) quantize writes, and show the mismatch the pinning then removes."""
    _, _, e, im = quant_model
    imatrix = im.means() if use_im else None
    plan = gq._run_quantize(e.text, None, qtype, imatrix, {}, 1)
    assert not list(tmp_path.iterdir()) and not list(e.text.parent.glob(".*dry-run*"))
    plain = gq.quantize_text_gguf(e.text, tmp_path / "plain.gguf", qtype, imatrix=imatrix, nthread=1,
                                  match_experts=False)
    assert plan == plain.types
    assert gq.expert_type_mismatches(plan)


@pytest.mark.llamacpp
def test_q4_0_with_imatrix_bumps_first_ffn_down_for_both_experts(quantized):
    t = quantized["q4_0", True].types
    assert t["blk.0.ffn_down.weight"] == t["blk.0.vis_down.weight"] == "Q4_1"
    assert quantized["q4_0", False].types["blk.0.vis_down.weight"] == "Q4_0"


@pytest.mark.llamacpp
def test_the_imatrix_changes_visual_expert_weights(quantized):
    def data(path, name):
        return next(np.asarray(t.data).tobytes() for t in gguf.GGUFReader(path).tensors if t.name == name)

    a, b = quantized["q4_k_m", False].path, quantized["q4_k_m", True].path
    assert data(a, "blk.2.vis_gate.weight") != data(b, "blk.2.vis_gate.weight")
    assert data(a, "blk.2.ffn_gate.weight") != data(b, "blk.2.ffn_gate.weight")


# ------------------------------------------------------------------- loading
@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", ["q8_0", "q4_k_m", "q4_0"])
def test_quantized_text_gguf_loads_and_generates(quant_model, quantized, mmproj_q8, qtype, tokenizer):
    from vlmexport.core.prompt import Turn
    from vlmexport.runtimes.torch_session import TorchSession
    from vlmexport.runtimes.pipeline import Pipeline
    from vlmexport.runtimes.spec import ModelSpec

    model, d, _, _ = quant_model
    pre = PreprocessConfig(image_size=32)
    with lb.LlamaCppSession(quantized[qtype, True].path, mmproj_q8.path, n_ctx=N_CTX, n_threads=1) as s:
        spec = ModelSpec(image_tokens=model.image_tokens(), expert_routing=model.config.expert_routing,
                         position_ids=model.config.position_ids, pad_token_id=model.config.pad_token_id,
                         max_length=N_CTX)
        pipe = Pipeline(s, tokenizer, type(model).default_chat_template(), pre, spec)
        image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        text = pipe.generate("What colour is the shape?", [image], max_new_tokens=6)
        assert isinstance(text, str)
        # logits stay close to PyTorch's: quantization noise, not a broken file
        layout, pixels = pipe.prepare([Turn(user="What colour is the shape?", images=1)], [image])
        s.reset()
        got = s.prefill(layout, s.encode_images(pixels))
        ref_s = TorchSession(model, max_length=N_CTX)
        ref = ref_s.prefill(layout, ref_s.encode_images(pixels))
        # A jittered random tiny model is very sensitive to weight noise: measured over 3 images,
        # correlation with PyTorch's prompt logits q8_0 >= 0.983, q4_k_m >= 0.69, q4_0 >= 0.55 (a
        # file of another model correlates ~0). Accuracy figures come from a trained model.
        corr = float(np.corrcoef(got, ref)[0, 1])
        assert corr > {"q8_0": 0.97, "q4_k_m": 0.5, "q4_0": 0.4}[qtype], corr


@pytest.fixture(scope="module")
def mmproj_q8(quant_model, tmp_path_factory):
    return gq.quantize_mmproj_gguf(quant_model[2].mmproj, tmp_path_factory.mktemp("mm") / "mmproj.q8_0.gguf")


@pytest.mark.llamacpp
def test_quantized_file_loads_without_the_env_override(quantized, monkeypatch):
    """Without VLMEXPORT_LLAMACPP_EXTRA_BUFTS the session decides (on a CPU reporting AMX, by
    a subprocess probe); either way decoding must not crash the process."""
    from vlmexport.core.layout import TextPiece, build_layout

    monkeypatch.delenv(lb.EXTRA_BUFTS_ENV, raising=False)
    with lb.LlamaCppSession(quantized["q4_0", False].path, None, n_ctx=N_CTX, n_threads=1) as s:
        logits = s.prefill(build_layout([TextPiece((1, 5, 6))], "image_chunk", "sequential"), None)
    assert np.isfinite(logits).all()


@pytest.mark.llamacpp
def test_llama_cpps_quantizer_quantizes_the_mmproj_and_libmtmd_runs_it(quant_model, mmproj_q8):
    from vlmexport.core.preprocess import preprocess
    from vlmexport.runtimes.torch_session import TorchSession

    model, d, e, _ = quant_model
    types = mmproj_q8.types
    shapes = {t.name: list(t.shape) for t in gguf.GGUFReader(e.mmproj).tensors}  # GGUF order: ne0 first
    assert types["v.patch_embd.weight"] == "F16" and types["v.position_embd.weight"] == "F32"
    for name, t in types.items():
        if len(shapes[name]) == 2 and name.endswith(".weight") and "patch_embd" not in name and "position" not in name:
            assert t == ("Q8_0" if shapes[name][0] % 32 == 0 else "F16"), name
    assert types["mm.up.weight"] == "Q8_0"
    pre = PreprocessConfig(image_size=32)
    pix = np.stack([preprocess(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8), pre)
                    for i in range(2)])
    with lb.LlamaCppSession(e.text, mmproj_q8.path, n_ctx=N_CTX, n_threads=1) as s:
        got = s.encode_images(pix)
    ref = TorchSession(model, max_length=N_CTX).encode_images(pix)
    # measured 1.6e-2..2.0e-2 (f16 mmproj: 1.3e-3..1.8e-3) on this jittered model
    assert float(np.abs(got - ref).max() / np.abs(ref).max()) < 3e-2


@pytest.mark.llamacpp
def test_wrong_file_kinds_are_clear_errors(quant_model, tmp_path):
    e = quant_model[2]
    with pytest.raises(ConfigError, match="quantize_mmproj_gguf"):
        gq.quantize_text_gguf(e.mmproj, tmp_path / "x.gguf", "q8_0")
    with pytest.raises(ConfigError, match="not an mmproj"):
        gq.quantize_mmproj_gguf(e.text, tmp_path / "y.gguf")
    with pytest.raises(ConfigError, match="q8_0 only"):
        gq.quantize_mmproj_gguf(e.mmproj, tmp_path / "z.gguf", "q4_k_m")


def test_unknown_quant_type_is_a_one_line_error():
    with pytest.raises(ConfigError) as exc:
        gq.normalize_quant_type("q3_k_s")
    msg = str(exc.value)
    assert "\n" not in msg and all(q in msg for q in ("q8_0", "q4_k_m", "q4_0"))
    assert gq.normalize_quant_type("Q4_K_M") == "q4_k_m"


def test_language_twin_names():
    assert gq.language_twin("blk.7.vis_down.weight") == "blk.7.ffn_down.weight"
    assert gq.language_twin("blk.0.vis_attn_qkv.weight") == "blk.0.attn_qkv.weight"
    assert gq.language_twin("blk.0.attn_qkv.weight") is None


# --------------------------------------------------------------------- imatrix
def test_imatrix_visual_stats_come_only_from_image_tokens(tiny_model, tmp_path_factory, tokenizer_path):
    """Hand check on layer 0: the QKV inputs are input_layernorm(embeddings); the visual
    expert's statistics must be those of the image positions alone, the language expert's
    those of the text positions alone."""
    from vlmexport.core.layout import VISION, ImagePiece, TextPiece, build_layout

    model = tiny_model("cogvlm", seed=5, jitter=True)
    d = save(model, tmp_path_factory, tokenizer_path, "im-cogvlm")
    plan = gw.plan_text(gw.GGUFSource.open(d), "f16")
    layout = build_layout([TextPiece((1, 5, 6, 7)), ImagePiece(model.image_tokens()), TextPiece((8, 9, 10))],
                          model.config.expert_routing, model.config.position_ids)
    pix = torch.from_numpy(np.random.default_rng(2).normal(size=(1, 3, 32, 32)).astype(np.float32))

    def run():
        from vlmexport.runtimes.torch_session import TorchSession

        s = TorchSession(model, max_length=64)
        s.prefill(layout, s.encode_images(pix.numpy()))

    im = gi.compute_imatrix(model, plan, [run])
    with torch.inference_mode():
        emb = model.embed(torch.as_tensor(layout.input_ids[None]), torch.as_tensor(layout.is_image[None]),
                          model.image_embeddings(pix))
        x = model.model.layers[0].input_layernorm(emb)[0].double()
    vis = torch.as_tensor(layout.token_type == VISION)
    n_img = int(vis.sum())
    assert n_img == model.image_tokens()
    e_v, e_l = im.entries["blk.0.vis_attn_qkv.weight"], im.entries["blk.0.attn_qkv.weight"]
    assert e_v.count == n_img and e_l.count == len(layout) - n_img
    np.testing.assert_allclose(e_v.sum2, (x[vis] ** 2).sum(0).numpy(), rtol=1e-5)
    np.testing.assert_allclose(e_l.sum2, (x[~vis] ** 2).sum(0).numpy(), rtol=1e-5)
    # every matmul of the text decoder has an entry: 5 per expert per layer (+ output when untied)
    n_layers = model.config.num_hidden_layers
    assert sum(".vis_" in k for k in im.entries) == 5 * n_layers
    assert all(e.count > 0 for e in im.entries.values())
    assert im.entries["blk.1.vis_down.weight"].count == n_img
    assert im.entries["blk.1.vis_down.weight"].sum2.shape == (model.config.intermediate_size,)


def test_imatrix_names_the_layer_with_nonfinite_activations(tiny_model, tmp_path_factory, tokenizer_path):
    from vlmexport.core.errors import DataError
    from vlmexport.models.checkpoint import load_pretrained

    model = tiny_model("cogvlm", seed=5, jitter=True)
    d = save(model, tmp_path_factory, tokenizer_path, "nan-cogvlm")
    loaded = load_pretrained(d, dtype=torch.float32)
    with torch.no_grad():
        loaded.model.model.layers[1].mlp.language_mlp.up_proj.weight[0, 0] = float("inf")
    plan = gw.plan_text(gw.GGUFSource.open(d), "f16")
    runs = gi.calibration_runs(loaded.model, loaded.tokenizer, PreprocessConfig(image_size=32),
                               type(loaded.model).default_chat_template(), gi.synthetic_items(32, 2, seed=3))
    with pytest.raises(DataError, match=r"NaN/inf activations at the input of blk\.1\.ffn_down\.weight"):
        gi.compute_imatrix(loaded.model, plan, runs)


def test_imatrix_file_is_llama_cpps_gguf_format(tmp_path):
    im = gi.Imatrix({"blk.0.attn_qkv.weight": gi.ImatrixEntry(np.array([4.0, 8.0]), 2),
                     "blk.0.vis_attn_qkv.weight": gi.ImatrixEntry(np.array([1.0, 3.0]), 1)},
                    ("synthetic-vqa:val:2",), 2)
    p = gi.write_imatrix(tmp_path / "m.imatrix.gguf", im)
    r = gguf.GGUFReader(p)
    assert r.fields["general.type"].contents() == "imatrix"
    assert r.fields[gi.KEY_DATASETS].contents() == ["synthetic-vqa:val:2"]
    assert r.fields[gi.KEY_CHUNK_COUNT].contents() == 2
    t = {x.name: x for x in r.tensors}
    assert t["blk.0.attn_qkv.weight.in_sum2"].tensor_type.name == "F32"
    assert list(t["blk.0.attn_qkv.weight.in_sum2"].shape) == [2, 1]  # GGUF order: ne0 = 2 columns, 1 matrix
    assert list(t["blk.0.attn_qkv.weight.counts"].shape) == [1, 1]
    back = gi.read_imatrix(p)
    np.testing.assert_allclose(back.means()["blk.0.attn_qkv.weight"], [2.0, 4.0])
    np.testing.assert_allclose(back.means()["blk.0.vis_attn_qkv.weight"], [1.0, 3.0])


@pytest.mark.llamacpp
def test_llama_quantize_reads_our_imatrix_file_like_the_python_api(quant_model, tmp_path):
    """llama.cpp's own imatrix reader (common/imatrix-loader.cpp, in the llama-quantize tool)
    takes our file and quantizes to exactly the bytes the C API gives with our means."""
    import os
    import subprocess

    exe = os.environ.get("VLMEXPORT_LLAMA_QUANTIZE")
    if not exe:
        pytest.skip("set VLMEXPORT_LLAMA_QUANTIZE to a llama-quantize binary (scripts/llama_quantize.sh builds one)")
    _, _, e, im = quant_model
    f = gi.write_imatrix(tmp_path / "model.imatrix.gguf", im)
    tool = tmp_path / "tool.gguf"
    run = subprocess.run([exe, "--imatrix", str(f), str(e.text), str(tool), "Q4_K_M", "1"], capture_output=True,
                         text=True, env={**os.environ, lb.EXTRA_BUFTS_ENV: "0"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"loaded {len(im.entries)} importance matrix entries" in run.stdout + run.stderr
    ours = gq.quantize_text_gguf(e.text, tmp_path / "api.gguf", "q4_k_m", imatrix=gi.read_imatrix(f).means(),
                                 nthread=1, match_experts=False)
    a = {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(tool).tensors}
    b = {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(ours.path).tensors}
    assert a.keys() == b.keys()
    assert [n for n in a if a[n] != b[n]] == []


# ------------------------------------------------------------------------ build
@pytest.mark.llamacpp
def test_build_writes_validates_and_loads_quantized_ggufs(tiny_model_dir, tmp_path, monkeypatch):
    import json

    import vlmexport
    from vlmexport.pipeline.build import IMATRIX_FILE, build

    llama_cpp_or_skip()
    d = tiny_model_dir("cogvlm", seed=3)
    out = tmp_path / "bundle"
    r = build(d, out, formats=("gguf",), precisions=("f16", "q4_k_m", "q8_0"), reference=False, e2e_prompts=2,
              imatrix_pairs=4)
    m = json.loads((out / "manifest.json").read_text())
    arts = {(a["part"], a["precision"]): a for a in m["artifacts"]}
    assert arts["text_decoder", "q4_k_m"]["file"] == "gguf/model.q4_k_m.gguf"
    assert arts["mmproj", "q4_k_m"]["file"] == arts["mmproj", "q8_0"]["file"] == "gguf/mmproj-model.q8_0.gguf"
    extra = arts["text_decoder", "q4_k_m"]["extra"]
    assert extra["imatrix"] == IMATRIX_FILE and extra["imatrix_pairs"] == 4 and (out / IMATRIX_FILE).is_file()
    assert gq.expert_type_mismatches(gq.tensor_types(out / "gguf/model.q4_k_m.gguf")) == []
    e2e = {(row["format"], row["precision"]): row for row in r.validation["end_to_end"]}
    assert e2e["gguf", "q4_k_m"]["required"] is False and 0.0 <= e2e["gguf", "q4_k_m"]["rate"] <= 1.0
    assert e2e["gguf", "f16"]["required"] is True
    texts = [p for p in r.validation["parts"] if p["part"] == "text_decoder" and p["precision"] == "q4_k_m"]
    assert texts and "correlation" in texts[0]
    pipe = vlmexport.load(out, backend="llamacpp", precision="q4_k_m")
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert isinstance(pipe.generate("What colour is the shape?", [image], max_new_tokens=4), str)


def test_build_rejects_an_unknown_gguf_precision(tiny_model_dir, tmp_path):
    from vlmexport.pipeline.build import build

    with pytest.raises(ConfigError, match="q4_k_m"):
        build(tiny_model_dir("cogvlm"), tmp_path / "b", formats=("gguf",), precisions=("q3_k_s",), validate=False)
