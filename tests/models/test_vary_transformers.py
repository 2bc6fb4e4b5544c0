"""External references for ``vary``: transformers' ``GotOcr2VisionEncoder`` (the SAM-style
ViTDet tower, GOT-OCR2's) and ``CLIPVisionModel``, and the whole model against a torch
composition of those two transformers modules + two MLP projectors + transformers'
``LlamaForCausalLM``. Tiny random configs, fp32, max |diff| <= 1e-4; the SAM encoder has a
grid that does not divide into windows (padding), a global block and relative positions.
Our ONNX graph of the SAM tower is checked against transformers too.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from vlmexport.models import get_architecture, seeded_init  # noqa: E402

ATOL = 1e-4


def jitter(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.fixture(scope="module")
def ours():
    A = get_architecture("vary")
    # 3 CLIP layers so that vision_feature_layer -2 is neither the first nor the last hidden state; a SAM
    # grid of 8x8 in windows of 3 (padded to 9x9: 9 windows), a global block between two windowed ones
    tiny = A.tiny_config()
    config = A.tiny_config(vision_config=dataclasses.replace(tiny.vision_config, num_hidden_layers=3),
                           sam_config=dataclasses.replace(tiny.sam_config, patch_size=4, num_hidden_layers=3,
                                                          global_attn_indexes=(1,)))
    model = seeded_init(A(config), 11).eval()
    jitter(model, 12)
    return model


def hf_sam(model):
    from transformers.models.got_ocr2.configuration_got_ocr2 import GotOcr2VisionConfig
    from transformers.models.got_ocr2.modeling_got_ocr2 import GotOcr2VisionEncoder

    sc = model.config.sam_config
    cfg = GotOcr2VisionConfig(hidden_size=sc.hidden_size, output_channels=sc.output_channels,
                              num_hidden_layers=sc.num_hidden_layers, num_attention_heads=sc.num_heads,
                              image_size=model.config.vision_config.image_size, patch_size=sc.patch_size,
                              mlp_dim=sc.mlp_dim, window_size=sc.window_size,
                              global_attn_indexes=list(sc.global_attn_indexes), hidden_act=sc.hidden_act)
    ref = GotOcr2VisionEncoder(cfg).eval()
    state = {k[len("vision_tower_high."):]: v for k, v in model.state_dict().items()
             if k.startswith("vision_tower_high.")}
    assert ref.load_state_dict(state, strict=True)  # every name is GotOcr2VisionEncoder's
    return ref


def hf_clip(model):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    vc = model.config.vision_config
    cfg = CLIPVisionConfig(hidden_size=vc.hidden_size, intermediate_size=vc.intermediate_size,
                           num_hidden_layers=vc.num_hidden_layers, num_attention_heads=vc.num_heads,
                           image_size=vc.image_size, patch_size=vc.patch_size, hidden_act=vc.hidden_act,
                           layer_norm_eps=vc.layer_norm_eps)
    ref = CLIPVisionModel(cfg).eval()
    state = {k[len("vision_tower."):]: v for k, v in model.state_dict().items()
             if k.startswith("vision_tower.")}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    return ref


def pixels(n: int, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(5))


def test_sam_tower_equals_got_ocr2_vision_encoder(ours):
    ref = hf_sam(ours)
    x = pixels(2)
    with torch.no_grad():
        expected = ref(x).last_hidden_state.flatten(2).transpose(1, 2)  # [B, C, g, g] -> tokens row-major
        got = ours.vision_tower_high(x)
    assert expected.shape == (2, 64, ours.config.sam_config.output_channels)
    diff = (got - expected).abs().max().item()
    assert diff <= ATOL, diff
    # sensitivity: the relative positions matter (a dropped rel-pos table would show)
    with torch.no_grad():
        saved = ours.vision_tower_high.layers[0].attn.rel_pos_h.clone()
        ours.vision_tower_high.layers[0].attn.rel_pos_h.mul_(-1)
        changed = (ours.vision_tower_high(x) - expected).abs().max().item()
        ours.vision_tower_high.layers[0].attn.rel_pos_h.copy_(saved)
    assert changed > 1e-3


def test_sam_onnx_graph_equals_got_ocr2_vision_encoder(ours, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from vlmexport.exporter.onnx_vision import StateDictTensors, export_vision_encoder

    spec = type(ours).part_specs(ours.config).vision.branches[1]
    g = export_vision_encoder(StateDictTensors(ours), spec, tmp_path / "sam.onnx")
    x = pixels(3)
    with torch.no_grad():
        expected = hf_sam(ours)(x).last_hidden_state.flatten(2).transpose(1, 2).numpy()
    got = ort.InferenceSession(str(g.path), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x.numpy()})[0]
    assert float(np.abs(got - expected).max()) <= ATOL


def test_clip_features_equal_clip_vision_model(ours):
    ref = hf_clip(ours)
    x = pixels(2)
    with torch.no_grad():
        expected = ref(x, output_hidden_states=True).hidden_states[-2][:, 1:]  # layer -2, CLS dropped (llava)
        got = ours.vision_encoder_module().clip(x)
    diff = (got - expected).abs().max().item()
    assert diff <= ATOL, diff


def test_whole_model_equals_a_composition_of_transformers_modules(ours):
    """CLIP tokens first, then the SAM tokens, each through its own projector, into LLaMA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = ours.config
    sam, clip = hf_sam(ours), hf_clip(ours)
    text = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                       num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                       num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                       rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta)
    llama = LlamaForCausalLM(text).eval()
    state = {k[len("language_model."):]: v for k, v in ours.state_dict().items() if k.startswith("language_model.")}
    llama.load_state_dict(state, strict=True)

    def mlp(prefix: str) -> torch.nn.Module:
        seq = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.GELU(), torch.nn.Linear(1, 1))
        w = ours.state_dict()
        for i, name in ((0, "linear_1"), (2, "linear_2")):
            seq[i].weight = torch.nn.Parameter(w[f"{prefix}.{name}.weight"].clone())
            seq[i].bias = torch.nn.Parameter(w[f"{prefix}.{name}.bias"].clone())
        return seq

    n = ours.image_tokens()
    ids = torch.tensor([[1, 40, 41] + [5] * n + [60, 61, 62]])
    is_image = torch.zeros_like(ids, dtype=torch.bool)
    is_image[0, 3:3 + n] = True
    x = pixels(1)
    with torch.no_grad():
        clip_feats = clip(x, output_hidden_states=True).hidden_states[-2][:, 1:]
        sam_feats = sam(x).last_hidden_state.flatten(2).transpose(1, 2)
        img = torch.cat((mlp("multi_modal_projector")(clip_feats), mlp("mm_projector_vary")(sam_feats)), dim=1)
        emb = llama.get_input_embeddings()(ids)
        emb[is_image] = img.reshape(-1, c.hidden_size)
        expected = llama(inputs_embeds=emb).logits
        got = ours(ids, torch.arange(ids.shape[1])[None], None, is_image, x)
    assert img.shape[1] == n == clip_feats.shape[1] + sam_feats.shape[1]
    diff = (got - expected).abs().max().item()
    assert diff <= ATOL, diff
    # sensitivity: the other token order gives other logits
    with torch.no_grad():
        swapped = torch.cat((img[:, clip_feats.shape[1]:], img[:, :clip_feats.shape[1]]), dim=1)
        emb[is_image] = swapped.reshape(-1, c.hidden_size)
        assert (llama(inputs_embeds=emb).logits - got).abs().max().item() > 1e-3
