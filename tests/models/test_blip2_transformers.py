"""External reference for the ``blip2`` layout: transformers' own ``Blip2ForConditionalGeneration``
with a LLaMA text config.

A tiny random transformers model (every parameter randomised: norms, biases, the fused qkv bias
(its k part too, although a key bias cannot change a softmax), the query tokens; a 3-layer
Q-Former with cross-attention every 2nd layer, so layer 1 has none; grouped-query attention in
the decoder) is saved by transformers and loaded by vlmexport, and the other way round; the
logits must agree in fp32 (max abs diff <= 1e-4).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vlmexport.core.preprocess import PreprocessConfig  # noqa: E402
from vlmexport.models.checkpoint import load_pretrained, save_pretrained  # noqa: E402

IMAGE_TOKEN = 319
IMAGE_SIZE, PATCH = 32, 8
N_QUERY = 6
ATOL = 1e-4


def tiny_hf_blip2(seed: int = 0):
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        LlamaConfig,
    )

    vision = Blip2VisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                               image_size=IMAGE_SIZE, patch_size=PATCH, hidden_act="gelu", layer_norm_eps=1e-6)
    qformer = Blip2QFormerConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                 cross_attention_frequency=2, layer_norm_eps=1e-12)
    text = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                       rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=N_QUERY,
                         image_token_index=IMAGE_TOKEN)
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * (0.1 if p.ndim == 1 else 0.05)
            norm_weight = ("norm" in name.lower()) and name.endswith("weight")
            p.copy_((1.0 if norm_weight else 0.0) + noise)
        model.query_tokens.copy_(torch.randn(model.query_tokens.shape, generator=gen))
    return model


def prompt_ids(n_images: int) -> torch.Tensor:
    """As Blip2Processor lays it out: every image's query tokens, then BOS and the text."""
    return torch.tensor([[IMAGE_TOKEN] * (N_QUERY * n_images) + [1, 40, 41, 50, 51, 60, 61, 62]])


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
    return tiny_hf_blip2()


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hf-blip2") / "model"
    hf_model.save_pretrained(d)
    PreprocessConfig(image_size=IMAGE_SIZE).save(d / "preprocessor_config.json")
    return d


@pytest.mark.parametrize("n_images", [1, 2])
def test_transformers_checkpoint_loads_with_equal_logits(hf_model, hf_dir, n_images):
    loaded = load_pretrained(hf_dir, require_tokenizer=False)
    model = loaded.model
    assert model.arch_name == "blip2"
    c = model.config
    assert (c.num_query_tokens, c.qformer_config.cross_attention_frequency, c.num_key_value_heads) == (N_QUERY, 2, 2)
    assert [layer.has_cross_attention for layer in model.qformer.encoder.layer] == [True, False, True]
    assert model.image_tokens() == N_QUERY
    diff = (our_logits(model, n_images) - hf_logits(hf_model, n_images)).abs().max().item()
    assert diff <= ATOL, f"max |logits diff| {diff:.3g}"


@pytest.mark.parametrize("tensor", ["vision_model.post_layernorm.bias", "query_tokens",
                                    "qformer.encoder.layer.2.crossattention.attention.value.bias"])
def test_the_post_norm_queries_and_last_cross_attention_matter(hf_model, hf_dir, tensor):
    """Sensitivity: the parity above is not blind to these (a dropped post_layernorm, fixed
    queries or a skipped cross-attention layer would show)."""
    model = load_pretrained(hf_dir, require_tokenizer=False).model
    with torch.no_grad():
        model.get_parameter(tensor).zero_()
    assert (our_logits(model, 1) - hf_logits(hf_model, 1)).abs().max() > 1e-3


def test_our_save_loads_in_transformers(hf_dir, tmp_path):
    from transformers import Blip2ForConditionalGeneration

    ours = load_pretrained(hf_dir, require_tokenizer=False).model
    out = save_pretrained(ours, tmp_path / "ours", None, PreprocessConfig(image_size=IMAGE_SIZE))
    theirs, info = Blip2ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    theirs.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for n_images in (1, 2):
        diff = (hf_logits(theirs, n_images) - our_logits(ours, n_images)).abs().max().item()
        assert diff <= ATOL, f"max |logits diff| {diff:.3g}"


def test_text_branch_ffn_of_older_checkpoints_is_ignored(hf_model, hf_dir, tmp_path):
    """transformers 4.x checkpoints carry the Q-Former's text-branch FFN (intermediate / output);
    only the queries run, so those tensors are skipped and the logits stay the same."""
    from safetensors.torch import load_file, save_file

    d = tmp_path / "with-text-ffn"
    d.mkdir()
    for p in hf_dir.iterdir():
        if p.name != "model.safetensors":
            (d / p.name).write_bytes(p.read_bytes())
    state = load_file(str(hf_dir / "model.safetensors"))
    extra = {k.replace("intermediate_query", "intermediate").replace("output_query", "output"): v.clone() + 1
             for k, v in state.items() if "_query." in k}
    assert extra
    save_file({**state, **extra}, str(d / "model.safetensors"), metadata={"format": "pt"})
    model = load_pretrained(d, require_tokenizer=False).model
    diff = (our_logits(model, 1) - hf_logits(hf_model, 1)).abs().max().item()
    assert diff <= ATOL
