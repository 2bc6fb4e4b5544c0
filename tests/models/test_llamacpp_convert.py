"""External reference for the ``cogvlm`` layout: llama.cpp's own, unmodified ``convert_hf_to_gguf.py``.

We save a tiny cogvlm checkpoint, run the converter on it in a subprocess (text model and
``--mmproj``), and read both GGUF files back with the ``gguf`` package. The tensor names
and hparam keys asserted here come from reading llama.cpp's ``conversion/cogvlm.py``,
``conversion/base.py`` and ``gguf-py/gguf/{constants,tensor_mapping}.py``.

The converter sources come from llama-cpp-python's sdist: set

    VLMEXPORT_LLAMA_CPP_DIR=/path/to/llama_cpp_python-0.3.36/vendor/llama.cpp

(the directory holding ``convert_hf_to_gguf.py``); without it these tests skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.llamacpp

gguf = pytest.importorskip("gguf")

from vlmexport.models import VisionConfig  # noqa: E402

ENV = "VLMEXPORT_LLAMA_CPP_DIR"


def llama_cpp_dir() -> Path:
    value = os.environ.get(ENV)
    if not value:
        pytest.skip(f"set {ENV} to llama.cpp's source directory (the one holding convert_hf_to_gguf.py, e.g. "
                    "llama_cpp_python-0.3.36/vendor/llama.cpp from the llama-cpp-python sdist) to run the "
                    "converter tests")
    root = Path(value).expanduser()
    for candidate in (root, root / "vendor" / "llama.cpp"):
        if (candidate / "convert_hf_to_gguf.py").is_file():
            return candidate
    pytest.fail(f"{ENV}={value} does not contain convert_hf_to_gguf.py; point it at llama.cpp's source directory")


def field(reader, key: str):
    f = reader.fields.get(key)
    assert f is not None, f"{key} is missing from the GGUF file"
    return f.contents()


def tensors(reader) -> dict[str, object]:
    return {t.name: t for t in reader.tensors}


def assert_tensor(ts: dict, name: str, expected: torch.Tensor) -> None:
    assert name in ts, f"{name} is missing; present: {sorted(ts)}"
    t = ts[name]
    expected = expected.detach().float().numpy()
    # GGUF lists dimensions fastest-varying first, i.e. reversed from torch/numpy
    assert [int(d) for d in t.shape] == list(reversed(expected.shape)), name
    assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
    data = np.asarray(t.data)
    assert data.shape == expected.shape, name
    np.testing.assert_array_equal(data, expected, err_msg=name)


# hparams chosen so that no two of them coincide: a key read from the wrong place shows
VISION = VisionConfig(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                      num_heads=6, layer_norm_eps=1e-5)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_model, tokenizer_path):
    """(model, text GGUF reader, mmproj GGUF reader), converted once for the module."""
    from vlmexport.core.preprocess import PreprocessConfig
    from vlmexport.models.checkpoint import save_pretrained

    src = llama_cpp_dir()
    model = tiny_model("cogvlm", seed=21, jitter=True, vision_config=VISION, rms_norm_eps=1e-6)
    work = tmp_path_factory.mktemp("llamacpp")
    model_dir = save_pretrained(model, work / "tiny-cogvlm", tokenizer_path, PreprocessConfig(image_size=32))
    out = {}
    for kind, extra in (("text", []), ("mmproj", ["--mmproj"])):
        outfile = work / f"{kind}.gguf"
        cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(model_dir), "--outfile", str(outfile),
               "--outtype", "f32", *extra]
        proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        assert outfile.is_file(), f"the converter wrote no {outfile}:\n{proc.stderr[-2000:]}"
        out[kind] = gguf.GGUFReader(outfile)
    return model, out["text"], out["mmproj"]


# ---------------------------------------------------------------- text model
def test_text_gguf_hparams(converted, tokenizer):
    model, text, _ = converted
    c = model.config
    assert field(text, "general.architecture") == "cogvlm" == model.gguf_arch
    assert field(text, "cogvlm.block_count") == c.num_hidden_layers
    assert field(text, "cogvlm.embedding_length") == c.hidden_size
    assert field(text, "cogvlm.feed_forward_length") == c.intermediate_size
    assert field(text, "cogvlm.attention.head_count") == c.num_attention_heads
    assert field(text, "cogvlm.attention.head_count_kv") == c.num_key_value_heads
    assert field(text, "cogvlm.context_length") == c.max_position_embeddings
    assert field(text, "cogvlm.rope.freq_base") == pytest.approx(c.rope_theta)
    assert field(text, "cogvlm.attention.layer_norm_rms_epsilon") == pytest.approx(c.rms_norm_eps, rel=1e-6)
    # the tokenizer goes in from tokenizer.model
    assert field(text, "tokenizer.ggml.model") == "llama"
    tokens = field(text, "tokenizer.ggml.tokens")
    assert len(tokens) == tokenizer.vocab_size
    assert tokens[5] == tokenizer.id_to_piece(5) and tokens[-1] == tokenizer.id_to_piece(tokenizer.vocab_size - 1)
    assert field(text, "tokenizer.ggml.bos_token_id") == tokenizer.bos_id
    assert field(text, "tokenizer.ggml.eos_token_id") == tokenizer.eos_id


def test_text_gguf_tensors_hold_our_language_weights(converted):
    model, text, _ = converted
    ts = tensors(text)
    m = model.model
    expected = {"token_embd.weight": m.embed_tokens.weight, "output_norm.weight": m.norm.weight,
                "output.weight": model.lm_head.weight}
    for i, layer in enumerate(m.layers):
        a, mlp = layer.self_attn, layer.mlp.language_mlp
        expected.update({
            f"blk.{i}.attn_norm.weight": layer.input_layernorm.weight,
            f"blk.{i}.attn_qkv.weight": a.language_expert_query_key_value.weight,
            f"blk.{i}.attn_output.weight": a.language_expert_dense.weight,
            f"blk.{i}.ffn_norm.weight": layer.post_attention_layernorm.weight,
            f"blk.{i}.ffn_gate.weight": mlp.gate_proj.weight,
            f"blk.{i}.ffn_up.weight": mlp.up_proj.weight,
            f"blk.{i}.ffn_down.weight": mlp.down_proj.weight,
        })
    for name, weight in expected.items():
        assert_tensor(ts, name, weight)
    assert set(ts) == set(expected)


def test_converter_drops_the_visual_experts(converted):
    """A known llama.cpp limitation, asserted so that an upstream fix is noticed.

    llama.cpp's ``cogvlm`` graph wants ``blk.N.vis_attn_qkv``, ``vis_attn_output``,
    ``vis_gate``, ``vis_up`` and ``vis_down``, but its converter's text-model filter skips
    every tensor whose name contains ``vision_`` (the visual-expert weights), so the text
    GGUF it writes cannot be loaded. See DESIGN.md ("Facts about llama.cpp's cogvlm
    support"): vlmexport's own GGUF writer must not depend on this converter. If this
    test fails, upstream has changed: revisit DESIGN.md and the GGUF exporter.
    """
    _, text, _ = converted
    names = set(tensors(text))
    assert not [n for n in names if ".vis_" in n or "vision" in n]
    for i in range(2):
        for t in ("vis_attn_qkv", "vis_attn_output", "vis_gate", "vis_up", "vis_down"):
            assert f"blk.{i}.{t}.weight" not in names


# ------------------------------------------------------------------- mmproj
def test_mmproj_hparams(converted):
    model, _, mm = converted
    vc, c = model.config.vision_config, model.config
    assert field(mm, "general.architecture") == "clip"
    assert field(mm, "general.type") == "mmproj"
    assert field(mm, "clip.projector_type") == "cogvlm"
    assert field(mm, "clip.has_vision_encoder") is True
    assert field(mm, "clip.vision.projection_dim") == c.hidden_size
    assert field(mm, "clip.vision.image_size") == vc.image_size
    assert field(mm, "clip.vision.patch_size") == vc.patch_size
    assert field(mm, "clip.vision.embedding_length") == vc.hidden_size
    assert field(mm, "clip.vision.feed_forward_length") == vc.intermediate_size
    assert field(mm, "clip.vision.block_count") == vc.num_hidden_layers
    assert field(mm, "clip.vision.attention.head_count") == vc.num_heads
    assert field(mm, "clip.vision.attention.layer_norm_epsilon") == pytest.approx(vc.layer_norm_eps, rel=1e-6)
    # image statistics come from our preprocessor_config.json
    from vlmexport.core.preprocess import CLIP_MEAN, CLIP_STD

    np.testing.assert_allclose(field(mm, "clip.vision.image_mean"), CLIP_MEAN, rtol=1e-6)
    np.testing.assert_allclose(field(mm, "clip.vision.image_std"), CLIP_STD, rtol=1e-6)


def test_mmproj_has_no_gelu_flag(converted):
    """Known llama.cpp fact (DESIGN.md): the converter writes no ``clip.use_gelu``, so llama.cpp's
    ViT falls back to quick-GELU although CogVLM's EVA-CLIP uses GELU. Noticed here if that changes."""
    _, _, mm = converted
    assert "clip.use_gelu" not in mm.fields


def test_mmproj_tensors_hold_our_vision_weights(converted):
    model, _, mm = converted
    ts = tensors(mm)
    v = model.model.vision
    pe, glu = v.patch_embedding, v.linear_proj
    expected = {
        "v.patch_embd.weight": pe.proj.weight, "v.patch_embd.bias": pe.proj.bias,
        "v.class_embd": pe.cls_embedding,
        # the converter copies the rows in the original order (CLS first); llama.cpp's ViT appends
        # CLS after the patches, which is why vlmexport's own GGUF writer reorders them
        "v.position_embd.weight": pe.position_embedding.weight,
        "mm.model.fc.weight": glu.linear_proj.weight,
        "mm.post_fc_norm.weight": glu.norm1.weight, "mm.post_fc_norm.bias": glu.norm1.bias,
        "mm.up.weight": glu.dense_h_to_4h.weight, "mm.gate.weight": glu.gate_proj.weight,
        "mm.down.weight": glu.dense_4h_to_h.weight,
        "v.boi": v.boi, "v.eoi": v.eoi,
    }
    for i, layer in enumerate(v.transformer.layers):
        for gguf_name, module in (("attn_qkv", layer.attention.query_key_value), ("attn_out", layer.attention.dense),
                                  ("ln1", layer.input_layernorm), ("ln2", layer.post_attention_layernorm),
                                  ("ffn_up", layer.mlp.fc1), ("ffn_down", layer.mlp.fc2)):
            expected[f"v.blk.{i}.{gguf_name}.weight"] = module.weight
            expected[f"v.blk.{i}.{gguf_name}.bias"] = module.bias
    for name, weight in expected.items():
        assert_tensor(ts, name, weight)
    assert set(ts) == set(expected)
    assert not [n for n in ts if n.startswith(("blk.", "token_embd", "output"))]
