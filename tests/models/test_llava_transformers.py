"""External reference for the ``llava`` layout: transformers' own ``LlavaForConditionalGeneration``.

A tiny random transformers model (CLIP tower with 3 layers, so ``vision_feature_layer=-2``
selects a hidden state that is neither the first nor the last; a LLaMA decoder with
grouped-query attention) is saved by transformers and loaded by vlmexport, and the other
way round; the logits must agree in fp32.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from vlmexport.core.preprocess import PreprocessConfig  # noqa: E402
from vlmexport.models.checkpoint import load_pretrained, save_pretrained  # noqa: E402

IMAGE_TOKEN = 319
IMAGE_SIZE, PATCH = 32, 8
N_PATCHES = (IMAGE_SIZE // PATCH) ** 2
ATOL = 1e-5


def tiny_hf_llava(seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    text = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                       rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", image_seq_length=N_PATCHES)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    # every parameter random, norms and biases included, so a dropped or swapped one shows
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * (0.1 if p.ndim == 1 else 0.05)
            p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + noise)
    return model


def prompt_ids(n_images: int) -> torch.Tensor:
    ids = [1, 40, 41]
    for i in range(n_images):
        ids += [IMAGE_TOKEN] * N_PATCHES + [50 + i, 51]
    ids += [60, 61, 62]
    return torch.tensor([ids])


def pixels(n: int) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(42))


def hf_logits(model, n_images: int) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=prompt_ids(n_images), pixel_values=pixels(n_images)).logits


def our_logits(model, n_images: int) -> torch.Tensor:
    ids = prompt_ids(n_images)
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1])[None], None, ids == IMAGE_TOKEN, pixels(n_images))


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_llava()


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hf-llava") / "model"
    hf_model.save_pretrained(d)
    pre = PreprocessConfig(image_size=IMAGE_SIZE, resize_mode="shortest_edge_center_crop")
    pre.save(d / "preprocessor_config.json")
    return d


@pytest.mark.parametrize("n_images", [1, 2])
def test_transformers_checkpoint_loads_with_equal_logits(hf_model, hf_dir, n_images):
    loaded = load_pretrained(hf_dir, require_tokenizer=False)
    assert loaded.model.arch_name == "llava" and loaded.tokenizer is None
    assert loaded.preprocess.resize_mode == "shortest_edge_center_crop"
    c = loaded.model.config
    assert (c.num_key_value_heads, c.image_token_index, c.vision_feature_layer) == (2, IMAGE_TOKEN, -2)
    assert loaded.model.image_tokens() == N_PATCHES
    expected = hf_logits(hf_model, n_images)
    torch.testing.assert_close(our_logits(loaded.model, n_images), expected, atol=ATOL, rtol=0)


def test_the_feature_layer_matters(hf_model, hf_dir, tmp_path):
    """Sensitivity check: selecting the last layer instead of the second-to-last gives other logits."""
    d = tmp_path / "last-layer"
    d.mkdir()
    for p in hf_dir.iterdir():
        (d / p.name).write_bytes(p.read_bytes())
    hf = json.loads((d / "config.json").read_text())
    hf["vision_feature_layer"] = -1
    (d / "config.json").write_text(json.dumps(hf))
    other = our_logits(load_pretrained(d, require_tokenizer=False).model, 1)
    assert (other - hf_logits(hf_model, 1)).abs().max() > 1e-3


def _rename(name: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, repl, name)
    raise AssertionError(f"no rule for {name}")


# transformers 5 writes vision_tower.*, multi_modal_projector.*, language_model.model.*, language_model.lm_head
LAYOUTS = {
    "transformers-4.52-modules": [
        (r"vision_tower\.(.*)", r"model.vision_tower.vision_model.\1"),
        (r"multi_modal_projector\.(.*)", r"model.multi_modal_projector.\1"),
        (r"language_model\.model\.(.*)", r"model.language_model.\1"),
        (r"language_model\.lm_head\.weight", r"lm_head.weight"),
    ],
    "llava-hf": [
        (r"vision_tower\.(.*)", r"vision_tower.vision_model.\1"),
        (r"(.*)", r"\1"),
    ],
    "transformers-5-modules": [
        (r"vision_tower\.(.*)", r"model.vision_tower.\1"),
        (r"multi_modal_projector\.(.*)", r"model.multi_modal_projector.\1"),
        (r"language_model\.model\.(.*)", r"model.language_model.\1"),
        (r"language_model\.lm_head\.weight", r"lm_head.weight"),
    ],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_checkpoint_aliases(hf_model, hf_dir, tmp_path, layout):
    d = tmp_path / layout
    d.mkdir()
    for p in hf_dir.iterdir():
        if p.name != "model.safetensors":
            (d / p.name).write_bytes(p.read_bytes())
    state = load_file(str(hf_dir / "model.safetensors"))
    renamed = {_rename(k, LAYOUTS[layout]): v for k, v in state.items()}
    assert len(renamed) == len(state)
    if layout != "llava-hf":
        assert not set(renamed) & set(state), "the renaming should change every name"
    save_file(renamed, str(d / "model.safetensors"), metadata={"format": "pt"})
    loaded = load_pretrained(d, require_tokenizer=False).model
    torch.testing.assert_close(our_logits(loaded, 2), hf_logits(hf_model, 2), atol=ATOL, rtol=0)


def test_our_save_loads_in_transformers(hf_dir, tmp_path):
    from transformers import LlavaForConditionalGeneration

    ours = load_pretrained(hf_dir, require_tokenizer=False).model
    out = save_pretrained(ours, tmp_path / "ours", None,
                          PreprocessConfig(image_size=IMAGE_SIZE, resize_mode="shortest_edge_center_crop"))
    theirs, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    theirs.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert theirs.config.text_config.num_key_value_heads == 2
    for n_images in (1, 2):
        torch.testing.assert_close(hf_logits(theirs, n_images), our_logits(ours, n_images), atol=ATOL, rtol=0)


def test_tiny_vlmexport_llava_loads_in_transformers(tiny_model, tiny_model_dir):
    """Our own randomly initialised llava (GQA, tiny_config) also runs in transformers."""
    from transformers import LlavaForConditionalGeneration

    model = tiny_model("llava", seed=9, jitter=True)
    d = tiny_model_dir("llava", model=model)
    theirs = LlavaForConditionalGeneration.from_pretrained(d).eval()
    n = model.image_tokens()
    tok = model.config.image_token_index
    ids = torch.tensor([[1, 7, 8] + [tok] * n + [9, 10]])
    px = pixels(1)
    with torch.no_grad():
        expected = theirs(input_ids=ids, pixel_values=px).logits
        got = model(ids, torch.arange(ids.shape[1])[None], None, ids == tok, px)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
