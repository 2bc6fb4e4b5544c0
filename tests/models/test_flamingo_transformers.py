"""External reference for ``flamingo``: transformers' ``IdeficsForVisionText2Text``.

A tiny random Idefics (CLIP tower, perceiver resampler, 4 LLaMA layers with a gated
cross-attention block before layers 0 and 2) is saved by transformers; vlmexport reads
its config.json and safetensors (strict: every tensor name must be ours) and the logits
must agree in fp32 on a prompt with text before the first image, two images interleaved,
and text after each (which exercises "attend to the most recent image" and "text before
the first image attends to none").
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from vlmexport.models.flamingo import Flamingo  # noqa: E402

IMAGE_TOKEN = 319
IMAGE_SIZE, PATCH = 32, 8
ATOL = 1e-4


def tiny_hf_idefics(seed: int = 0):
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    config = IdeficsConfig(
        vocab_size=320, additional_vocab_size=0, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6, cross_layer_interval=2,
        use_resampler=True, freeze_text_layers=False, freeze_vision_layers=False, alpha_type="float",
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
        vision_config=dict(embed_dim=48, image_size=IMAGE_SIZE, patch_size=PATCH, intermediate_size=96,
                           num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu"),
        perceiver_config=dict(use_resampler=True, resampler_n_latents=4, resampler_depth=2, resampler_n_heads=2,
                              resampler_head_dim=16))
    torch.manual_seed(seed)
    model = IdeficsForVisionText2Text(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # every parameter random (gates open), so a dropped or swapped one shows
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * (0.1 if p.ndim == 1 else 0.05)
            if "alpha" in name:
                noise = 0.5 + noise
            p.copy_((1.0 if re.search(r"norm|\.ln\.", name) and name.endswith("weight") else 0.0) + noise)
    return model


# BOS, text before any image (attends to none), image 1, text, image 2, text
PROMPT = [1, 40, 41, IMAGE_TOKEN, 50, 51, 52, IMAGE_TOKEN, 60, 61, 62]


def media_of(ids: list[int]) -> torch.Tensor:
    """The image each position attends to (transformers' processor: incremental image_attention_mask)."""
    out, seen = [], -1
    for t in ids:
        seen += t == IMAGE_TOKEN
        out.append(seen)
    return torch.tensor([out])


def pixels(n: int) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(42))


def hf_logits(model, ids: list[int], n_images: int) -> torch.Tensor:
    media = media_of(ids)
    mask = torch.nn.functional.one_hot(media.clamp(min=0), n_images) * (media >= 0)[..., None]
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), pixel_values=pixels(n_images)[None],
                     image_attention_mask=mask).logits


def our_logits(model, ids: list[int], n_images: int) -> torch.Tensor:
    t = torch.tensor([ids])
    with torch.no_grad():
        return model(t, torch.arange(t.shape[1])[None], None, None, pixels(n_images), media=media_of(ids))


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_idefics()


@pytest.fixture(scope="module")
def ours(hf_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("hf-idefics") / "model"
    hf_model.save_pretrained(d)
    hf = json.loads((d / "config.json").read_text())
    hf["image_token_id"] = IMAGE_TOKEN  # the processor's; config.json of Idefics does not carry it
    model = Flamingo(Flamingo.config_from_hf(hf)).eval()
    state = {k: v for k, v in load_file(str(Path(d) / "model.safetensors")).items()
             if not any(re.fullmatch(p, k) for p in Flamingo.checkpoint_ignored)}
    model.load_state_dict(state, strict=True)  # every checkpoint name is ours and every one of ours is there
    return model


def test_config_reads_the_idefics_structure(ours):
    c = ours.config
    assert (c.cross_layer_interval, c.num_cross_layers, c.resampler_n_latents, c.resampler_depth) == (2, 2, 4, 2)
    specs = Flamingo.part_specs(c)
    assert specs.image_tokens == 1 and specs.decoder.image_placement == "cross_attend"
    assert ours.image_embeddings(pixels(2)).shape == (2, 4, 2 * 2 * 64)  # every block's keys and values


def test_logits_equal_transformers_with_two_interleaved_images(hf_model, ours):
    expected = hf_logits(hf_model, PROMPT, 2)
    got = our_logits(ours, PROMPT, 2)
    err = (got - expected).abs().max().item()
    assert err <= ATOL, f"max abs logit difference {err:.2e}"
    # which image each position attends to matters (positions before the swap are unaffected)
    swapped = media_of(PROMPT).clone()
    swapped[0, 8:] = 0  # text after image 2 attending to image 1 instead
    with torch.no_grad():
        t = torch.tensor([PROMPT])
        wrong = ours(t, torch.arange(t.shape[1])[None], None, None, pixels(2), media=swapped)
    assert (wrong[:, 8:] - expected[:, 8:]).abs().max() > 1e-3
    assert (wrong[:, :8] - expected[:, :8]).abs().max() <= ATOL


def test_closed_gates_give_the_language_model(ours):
    """tanh(0) = 0: with the alphas at zero, the images change nothing (the untrained model is its LM)."""
    import copy

    closed = copy.deepcopy(ours)
    with torch.no_grad():
        for block in closed.model.gated_cross_attn_layers:
            block.alpha_cross_attn.zero_()
            block.alpha_dense.zero_()
    t = torch.tensor([PROMPT])
    with torch.no_grad():
        with_images = closed(t, torch.arange(t.shape[1])[None], None, None, pixels(2), media=media_of(PROMPT))
        text_only = closed(t, torch.arange(t.shape[1])[None])
    torch.testing.assert_close(with_images, text_only, atol=1e-6, rtol=0)
    assert (our_logits(ours, PROMPT, 2) - text_only).abs().max() > 1e-3


def test_our_save_loads_in_transformers(ours, hf_model, tmp_path):
    from safetensors.torch import save_file
    from transformers import IdeficsForVisionText2Text

    d = tmp_path / "ours"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(Flamingo.config_to_hf(ours.config)))
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, str(d / "model.safetensors"),
              metadata={"format": "pt"})
    theirs, info = IdeficsForVisionText2Text.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    got = hf_logits(theirs.eval(), PROMPT, 2)
    assert (got - hf_logits(hf_model, PROMPT, 2)).abs().max().item() <= ATOL


def test_fresh_gates_start_closed_unless_asked_open():
    from vlmexport.models import seeded_init

    closed = seeded_init(Flamingo(Flamingo.tiny_config()), 0)
    assert all(float(b.alpha_cross_attn.detach()) == 0 == float(b.alpha_dense.detach()) for b in closed.model.gated_cross_attn_layers)
    opened = seeded_init(Flamingo(Flamingo.tiny_config(alpha_initializer="ones")), 0)
    assert all(float(b.alpha_cross_attn.detach()) == 1 == float(b.alpha_dense.detach()) for b in opened.model.gated_cross_attn_layers)
    assert Flamingo.config_from_hf(Flamingo.config_to_hf(opened.config)).alpha_initializer == "ones"
