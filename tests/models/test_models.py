"""The model family, generated from the registry: every architecture gets every test.

- KV-cache decoding (``TorchSession`` prefill + one-token decode) equals full recompute,
  for every routing/position semantics an architecture accepts.
- Gather/scatter expert routing (``Route``) equals a dense reference that runs both
  experts everywhere and picks per position.
- The exported parts composed by hand equal ``forward``.
- Registry, hooks and config validation fail loudly.
"""

from __future__ import annotations

import numpy as np
import pytest
from arch_params import accepts_semantics, arch_semantics
import torch
from torch import nn

from vlmexport.core.errors import ConfigError
from vlmexport.core.layout import LANGUAGE, VISION, ImagePiece, TextPiece, build_layout
from vlmexport.core.names import ONNX_PARTS
from vlmexport.models import VLM, Part, architectures, get_architecture, register, seeded_init
from vlmexport.models.connectors import get_connector
from vlmexport.models.layers import Route, routed
from vlmexport.runtimes.torch_session import TorchSession

ARCHS = sorted(architectures())
EXPERT_ARCHS = sorted(n for n, A in architectures().items() if A.has_experts)
SEMANTICS = [("image_chunk", "sequential"), ("hf_cogvlm", "hf_cogvlm"), ("hf_cogvlm", "sequential"),
             ("image_chunk", "hf_cogvlm")]
ATOL = 1e-5


# every (architecture, semantics) pair that the architecture's config accepts
ARCH_SEMANTICS = arch_semantics(SEMANTICS)


def pixels(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def two_image_pieces(model: VLM, tail: tuple[int, ...] = (9, 10, 11)):
    n = model.image_tokens()
    return [TextPiece((1, 5, 6)), ImagePiece(n), TextPiece((7, 8)), ImagePiece(n), TextPiece(tail)]


def layout_for(model: VLM, pieces):
    c = model.config
    return build_layout(pieces, c.expert_routing, c.position_ids, image_pad_id=model.image_placeholder_id(),
                        image_placement=model.image_placement)


def chunk(cross, a: int, b: int | None = None):
    """The cross-attention input of positions a:b (None for a decoder that splices its images)."""
    return None if cross is None else cross.with_media(cross.media[:, a:b])


def as_batch(layout):
    t = torch.as_tensor
    return dict(input_ids=t(layout.input_ids)[None], position_ids=t(layout.position_ids)[None],
                token_type=t(layout.token_type)[None], is_image=t(layout.is_image)[None])


def full_logits(model: VLM, layout, px: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=px, **as_batch(layout))[0]


# ---------------------------------------------------------------- KV cache
def test_semantics_claims():
    assert ARCH_SEMANTICS, "the registry is empty"
    assert EXPERT_ARCHS, "no architecture with visual experts is registered"
    for arch in ARCHS:  # every architecture runs the defaults
        assert accepts_semantics(arch, "image_chunk", "sequential")


@pytest.mark.parametrize("arch, routing, positions", ARCH_SEMANTICS)
@pytest.mark.parametrize("static", [False, True], ids=["eager-decode", "static-decode"])
def test_kv_cache_decode_equals_full_recompute(tiny_model, arch, routing, positions, static):
    """Eager decoding (cache sliced to the sequence) and static decoding (fixed shapes over the
    whole cache, the form a CUDA graph replays) both equal a full recompute."""
    model = tiny_model(arch, seed=1, jitter=True, expert_routing=routing, position_ids=positions)
    continuation = (12, 40, 41, 200, 3)
    prompt = layout_for(model, two_image_pieces(model))
    full = layout_for(model, two_image_pieces(model) + [TextPiece(continuation)])
    # the continuation takes the positions that generation hands to decode()
    np.testing.assert_array_equal(full.position_ids[len(prompt):],
                                  prompt.next_position + np.arange(len(continuation)))
    px = pixels(2)
    expected = full_logits(model, full, px)

    session = TorchSession(model, max_length=96, static_decode=static)
    assert session.static_decode is static and not session.cuda_graphs
    embeds = session.encode_images(px.numpy())
    assert embeds.shape == tuple(model.image_embeddings(px).shape)
    got = session.prefill(prompt, embeds)
    np.testing.assert_allclose(got, expected[len(prompt) - 1].numpy(), atol=ATOL, rtol=0)
    for i, tok in enumerate(continuation):
        got = session.decode(tok, prompt.next_position + i)
        np.testing.assert_allclose(got, expected[len(prompt) + i].numpy(), atol=ATOL, rtol=0,
                                   err_msg=f"decode step {i}")

    # reset and reuse the cache for a shorter prompt: stale slots must not leak in
    session.reset()
    short = layout_for(model, [TextPiece((1, 2)), ImagePiece(model.image_tokens()), TextPiece((4,))])
    got = session.prefill(short, session.encode_images(px[1:].numpy()))
    np.testing.assert_allclose(got, full_logits(model, short, px[1:])[-1].numpy(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch, routing, positions", ARCH_SEMANTICS)
@pytest.mark.parametrize("split", [2, 5, 20])
def test_chunked_prefill_equals_full(tiny_model, arch, routing, positions, split):
    """Prefill in two chunks (the second one at cache offset > 0, several positions long)."""
    model = tiny_model(arch, seed=2, jitter=True, expert_routing=routing, position_ids=positions)
    lay = layout_for(model, two_image_pieces(model))
    split = min(split, len(lay) - 1)  # a cross-attending layout is short (one placeholder per image)
    b = as_batch(lay)
    px = pixels(2, seed=1)
    with torch.no_grad():
        emb, cross = model.decoder_inputs(b["input_ids"], b["is_image"], model.image_embeddings(px))
        expected = model.decode(emb, b["token_type"], b["position_ids"], cross=cross)[0]
        cache = model.new_cache(1, 80)
        first = model.decode(emb[:, :split], b["token_type"][:, :split], b["position_ids"][:, :split], cache=cache,
                             cross=chunk(cross, 0, split))
        assert cache.length == split
        second = model.decode(emb[:, split:], b["token_type"][:, split:], b["position_ids"][:, split:], cache=cache,
                              start=split, cross=chunk(cross, split))
    torch.testing.assert_close(torch.cat((first[0], second[0])), expected, atol=ATOL, rtol=0)


def test_session_refuses_prompts_longer_than_its_cache(tiny_model):
    model = tiny_model(ARCHS[0])
    session = TorchSession(model, max_length=8)
    lay = build_layout([TextPiece(tuple(range(1, 12)))])
    with pytest.raises(ValueError, match="context holds 8"):
        session.prefill(lay, None)


@pytest.mark.parametrize("arch", EXPERT_ARCHS)
def test_semantics_change_the_logits(tiny_model, arch):
    """Sensitivity check for the parity tests above: the semantics reach the decoder."""
    px = pixels(2)
    outs = []
    for routing, positions in (("image_chunk", "sequential"), ("hf_cogvlm", "sequential"), ("hf_cogvlm", "hf_cogvlm")):
        model = tiny_model(arch, seed=1, jitter=True, expert_routing=routing, position_ids=positions)
        outs.append(full_logits(model, layout_for(model, two_image_pieces(model)), px))
    assert (outs[0][-1] - outs[1][-1]).abs().max() > 1e-3
    assert (outs[1][-1] - outs[2][-1]).abs().max() > 1e-3


# ------------------------------------------------------------------ routing
def dense_reference(token_type: torch.Tensor, x: torch.Tensor, f_language: nn.Module, f_vision: nn.Module):
    """Both experts on every position, then pick per position."""
    return torch.where((token_type == VISION)[..., None], f_vision(x), f_language(x))


@pytest.mark.parametrize("kind", ["mixed", "all_text", "all_vision", "one_vision"])
def test_route_equals_dense_reference(kind):
    g = torch.Generator().manual_seed(0)
    B, S, D = 2, 9, 16
    x = torch.randn(B, S, D, generator=g)
    tt = {"mixed": torch.randint(0, 2, (B, S), generator=g), "all_text": torch.zeros(B, S, dtype=torch.long),
          "all_vision": torch.ones(B, S, dtype=torch.long),
          "one_vision": torch.zeros(B, S, dtype=torch.long).index_put_((torch.tensor([1]), torch.tensor([4])),
                                                                       torch.tensor(1))}[kind]
    torch.manual_seed(0)
    f_lang, f_vis = nn.Linear(D, 24), nn.Linear(D, 24)
    route = Route.from_token_type(tt)
    assert (route is None) == (kind == "all_text")
    with torch.no_grad():
        got = routed(route, x, f_lang, f_vis)
        torch.testing.assert_close(got, dense_reference(tt, x, f_lang, f_vis), atol=1e-6, rtol=0)
    if route is not None:
        assert sorted(torch.cat((route.language, route.vision)).tolist()) == list(range(B * S))


def test_route_feeds_each_expert_only_its_own_positions():
    tt = torch.tensor([[0, 1, 1, 0, 1]])
    seen = {}

    class Spy(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            seen[self.name] = x.clone()
            return x * (2 if self.name == "vision" else 3)

    x = torch.arange(5.0).reshape(1, 5, 1)
    out = routed(Route.from_token_type(tt), x, Spy("language"), Spy("vision"))
    assert seen["vision"].flatten().tolist() == [1.0, 2.0, 4.0]
    assert seen["language"].flatten().tolist() == [0.0, 3.0]
    assert out.flatten().tolist() == [0.0, 2.0, 4.0, 9.0, 8.0]


@pytest.mark.parametrize("arch", EXPERT_ARCHS)
@pytest.mark.parametrize("routing", ["image_chunk", "hf_cogvlm"])
def test_model_routing_equals_dense_reference(tiny_model, arch, routing, monkeypatch):
    model = tiny_model(arch, seed=3, jitter=True, expert_routing=routing)
    lay = layout_for(model, two_image_pieces(model))
    px = pixels(2, seed=2)
    sparse = full_logits(model, lay, px)

    def dense_apply(self: Route, x, f_language, f_vision):
        B, S, _ = x.shape
        tt = torch.full((B * S,), LANGUAGE, dtype=torch.long)
        tt[self.vision] = VISION
        return dense_reference(tt.reshape(B, S), x, f_language, f_vision)

    monkeypatch.setattr(Route, "apply", dense_apply)
    dense = full_logits(model, lay, px)
    torch.testing.assert_close(sparse, dense, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", EXPERT_ARCHS)
def test_visual_experts_only_touch_vision_positions(tiny_model, arch):
    model = tiny_model(arch, seed=4, jitter=True)
    text = build_layout([TextPiece(tuple(range(1, 12)))])
    img = layout_for(model, two_image_pieces(model))
    px = pixels(2)
    text_before, img_before = full_logits(model, text, None), full_logits(model, img, px)
    pairs = list(model.iter_visual_expert_pairs())
    assert pairs
    with torch.no_grad():
        for _, vision in pairs:
            for p in vision.parameters():
                p.mul_(-3.0).add_(0.05)
    # the all-text case runs the language expert only
    torch.testing.assert_close(full_logits(model, text, None), text_before, atol=0, rtol=0)
    # the first image position is routed to the visual expert: everything from there on changes
    first = img.image_spans[0][0]
    torch.testing.assert_close(full_logits(model, img, px)[:first], img_before[:first], atol=1e-6, rtol=0)
    assert (full_logits(model, img, px)[first:] - img_before[first:]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", EXPERT_ARCHS)
def test_identical_experts_make_routing_irrelevant(tiny_model, arch):
    """Stage 2 initialises the visual experts from the language weights."""
    model = tiny_model(arch, seed=5, jitter=True)
    with torch.no_grad():
        for lang, vision in model.iter_visual_expert_pairs():
            vision.load_state_dict(lang.state_dict())
    lay = layout_for(model, two_image_pieces(model))
    b = as_batch(lay)
    px = pixels(2)
    with torch.no_grad():
        a = model(pixel_values=px, **b)
        b["token_type"] = torch.zeros_like(b["token_type"])
        torch.testing.assert_close(model(pixel_values=px, **b), a, atol=1e-6, rtol=0)


# -------------------------------------------------------------------- parts
@pytest.mark.parametrize("arch", ARCHS)
def test_parts_composed_by_hand_equal_forward(tiny_model, arch):
    model = tiny_model(arch, seed=6, jitter=True)
    parts = model.parts()
    assert set(parts) == set(ONNX_PARTS)
    lay = layout_for(model, two_image_pieces(model))
    b = as_batch(lay)
    px = pixels(2, seed=4)
    with torch.no_grad():
        feats = parts[Part.VISION_ENCODER](px)
        img = parts[Part.CONNECTOR](feats)
        emb = parts[Part.TOKEN_EMBEDDING](b["input_ids"]).clone()
        cross = None
        if model.image_placement == "splice":
            emb[b["is_image"]] = img.reshape(-1, emb.shape[-1])
        else:  # the connector's output is the decoder's cross-attention memory
            cross = model.cross_attention(img, model.media_of(b["input_ids"]))
        by_hand = parts[Part.TEXT_DECODER](emb, b["token_type"], b["position_ids"], cross=cross)
        expected = model(pixel_values=px, **b)
    torch.testing.assert_close(by_hand, expected, atol=1e-6, rtol=0)
    # the parts share the model's parameters (no copies)
    model_ptrs = {p.data_ptr() for p in model.parameters()}
    for part in parts.values():
        assert {p.data_ptr() for p in part.parameters()} <= model_ptrs


@pytest.mark.parametrize("arch", ARCHS)
def test_image_chunk_length_is_image_tokens(tiny_model, arch):
    model = tiny_model(arch)
    with torch.no_grad():
        emb = model.image_embeddings(pixels(3))
    x = model.part_specs(model.config).decoder.cross_attention
    if x is None:  # spliced: one embedding per image position
        assert emb.shape == (3, model.image_tokens(), model.config.hidden_size)
        specs = type(model).part_specs(model.config)
        merges = get_connector(specs.connector.kind).patch_tokens(specs.connector, specs.vision.output_tokens)
        if get_connector(specs.connector.kind).fixed_tokens(specs.connector) is None:
            assert merges <= specs.vision.output_tokens  # a kind keeps every ViT output, or merges some (pixel shuffle)
        assert model.image_tokens() >= merges
    else:  # cross-attended: the placeholder(s) in the sequence, the memory rows beside it
        assert emb.shape == (3, x.memory_tokens, x.memory_width) and model.image_tokens() == x.placeholder_tokens


def test_cogvlm_chunk_is_boi_patches_eoi(tiny_model):
    model = tiny_model("cogvlm", jitter=True)
    n = model.config.vision_config.num_patches
    assert model.image_tokens() == n + 2
    with torch.no_grad():
        emb = model.image_embeddings(pixels(2))
    v = model.model.vision
    torch.testing.assert_close(emb[:, 0], v.boi[0].expand(2, -1), atol=0, rtol=0)
    torch.testing.assert_close(emb[:, -1], v.eoi[0].expand(2, -1), atol=0, rtol=0)


def test_llava_chunk_length_follows_the_feature_strategy(tiny_model):
    n = tiny_model("llava").config.vision_config.num_patches
    assert tiny_model("llava").image_tokens() == n
    full = tiny_model("llava", vision_feature_select_strategy="full")
    assert full.image_tokens() == n + 1
    with torch.no_grad():
        assert full.image_embeddings(pixels(1)).shape[1] == n + 1


@pytest.mark.parametrize("arch", ARCHS)
def test_embed_rejects_a_wrong_number_of_image_embeddings(tiny_model, arch):
    model = tiny_model(arch)
    b = as_batch(layout_for(model, two_image_pieces(model)))
    with torch.no_grad(), pytest.raises(ValueError, match="image positions"):
        model(pixel_values=pixels(1), **b)


# ------------------------------------------------------------ init / registry
@pytest.mark.parametrize("arch", ARCHS)
def test_seeded_init_is_deterministic(arch):
    A = get_architecture(arch)
    a = A(A.tiny_config())  # (constructing a module draws from the global RNG itself)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    seeded_init(a, 7)
    assert torch.equal(torch.rand(3), expected_next), "seeded_init must not disturb the global RNG"
    b = seeded_init(A(A.tiny_config()), 7)
    c = seeded_init(A(A.tiny_config()), 8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_registry_lists_every_architecture():
    archs = architectures()
    assert {"cogvlm", "llava"} <= set(archs)
    for name, A in archs.items():
        assert A.arch_name == name and get_architecture(name) is A
        assert issubclass(A, VLM) and A.hf_architectures and A.gguf_arch
        assert isinstance(A.tiny_config(), A.config_class)


def test_unknown_architecture_names_the_choices():
    with pytest.raises(ConfigError) as exc:
        get_architecture("blip3")
    msg = str(exc.value)
    assert "blip3" in msg
    for name in architectures():
        assert name in msg


def test_subclass_missing_a_hook_fails_at_class_creation():
    base = get_architecture("llava")
    from vlmexport.models.base import _REQUIRED_HOOKS

    hooks = {name: getattr(base, name) for name in _REQUIRED_HOOKS if name not in ("arch_name", "part_specs")}
    with pytest.raises(TypeError, match=r"MissingHooks is missing \['arch_name', 'part_specs'\]"):
        type("MissingHooks", (VLM,), dict(hooks))
    with pytest.raises(TypeError, match="Bare is missing"):
        class Bare(VLM):  # noqa: F841 - creating the class is the test
            arch_name = "bare"
    before = dict(architectures())

    # an explicitly abstract intermediate class is allowed; its concrete subclasses are checked
    class Intermediate(VLM):
        abstract = True

    with pytest.raises(TypeError, match="Concrete is missing"):
        class Concrete(Intermediate):  # noqa: F841
            arch_name = "concrete"
    assert architectures() == before


def test_registering_a_name_twice_is_refused():
    cog = get_architecture("cogvlm")
    with pytest.raises(RuntimeError, match="registered twice"):
        register(type("Impostor", (cog,), {}))
    assert get_architecture("cogvlm") is cog


# --------------------------------------------------------------- validation
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("overrides, match", [
    (dict(hidden_size=66), "not divisible by num_attention_heads"),
    (dict(expert_routing="everything"), "expert_routing"),
    (dict(position_ids="rope2d"), "position_ids"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
])
def test_config_validation(arch, overrides, match):
    with pytest.raises(ConfigError, match=match):
        get_architecture(arch).tiny_config(**overrides)


@pytest.mark.parametrize("arch", ARCHS)
def test_vision_config_validation(arch):
    from vlmexport.models import VisionConfig

    with pytest.raises(ConfigError, match="multiple of patch_size"):
        get_architecture(arch).tiny_config(vision_config=VisionConfig(image_size=30, patch_size=8, hidden_size=48,
                                                                      num_heads=4))
    with pytest.raises(ConfigError, match="divisible by num_heads"):
        VisionConfig(image_size=32, patch_size=8, hidden_size=50, num_heads=4)


def test_llava_rejects_hf_cogvlm_semantics():
    A = get_architecture("llava")
    with pytest.raises(ConfigError, match="llava"):
        A.tiny_config(expert_routing="hf_cogvlm")
    with pytest.raises(ConfigError, match="llava"):
        A.tiny_config(position_ids="hf_cogvlm")


def test_cogvlm_needs_equal_kv_heads():
    A = get_architecture("cogvlm")
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        A(A.tiny_config(num_key_value_heads=2))
