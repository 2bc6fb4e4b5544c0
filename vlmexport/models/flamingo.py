"""``flamingo``: CLIP ViT -> perceiver resampler -> LLaMA with gated cross-attention blocks.

The open Flamingo reproduction as transformers' ``IdeficsForVisionText2Text`` writes it
(module names are its ``save_pretrained`` names: ``model.vision_model.*``,
``model.perceiver_resampler.*``, ``model.layers.*``, ``model.gated_cross_attn_layers.*``,
``lm_head.weight``):

- the ViT's last hidden states, CLS included (no post-LayerNorm: Idefics applies it to
  the pooled output only), go through the perceiver resampler: ``n_latents`` learned
  latents that cross-attend to [features; latents] in ``depth`` blocks, then a LayerNorm.
  The ``connector`` part is the resampler followed by every gated block's key and value
  projections: one image becomes ``n_latents`` rows of precomputed keys/values, computed
  once per image and read by every decoder step (connectors/perceiver.py);
- the image is not spliced into the token sequence: the prompt holds one ``<image>``
  token per image (``image_placement = cross_attend``) and, before every
  ``cross_layer_interval``-th decoder layer, a gated cross-attention block lets each
  position attend to the latents of the image that most recently precedes it (the
  ``<image>`` token included); positions before the first image attend to none, and their
  cross-attention output is zeroed (transformers' ``cross_attention_gate``). The block is
  ``x + tanh(alpha_cross_attn) * xattn(RMSNorm(x))``, then
  ``x + tanh(alpha_dense) * MLP(RMSNorm(x))``; the alphas start at 0, so an untrained
  model is its language model.

Not supported (each a one-line ConfigError): ``use_resampler=False``, ``qk_layer_norms``,
``additional_vocab_size > 0`` (Idefics' decoupled embeddings), grouped-query attention.
transformers' Idefics also stops a position attending to an image after an end-of-document
token until the next image (packed training data); prompts here hold one document.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from ..core.layout import ExpertRouting, ImagePlacement, PositionIds
from ..core.prompt import ChatTemplate
from .base import VLM, VisionConfig, VLMConfig, register
from .layers import CrossAttention, KVCache, RMSNorm, SwiGLU, rope_cos_sin
from .llava import CLIPVisionTower, LlamaAttention
from .spec import ConnectorSpec, CrossAttentionSpec, DecoderSpec, ExpertNames, PartSpecs, VisionSpec

# plain "User: <image>question<end_of_utterance>\nAssistant:" (HuggingFaceM4/idefics-9b-instruct's turn format)
FLAMINGO_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'User: ' }}{% else %}{{ 'Assistant: ' }}"
    "{% endif %}{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<image>' }}"
    "{% elif content['type'] == 'text' %}{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ content['text'] }}{% endgeneration %}{% else %}{{ content['text'] }}{% endif %}{% endif %}{% endfor %}"
    "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@dataclass
class FlamingoConfig(VLMConfig):
    image_token_id: int = 32000  # the "<image>" placeholder (transformers' processor's image_token_id)
    cross_layer_interval: int = 1
    alpha_type: str = "float"  # "float": one gate per block; "vector": one per channel
    # Idefics' alpha_initializer: "zeros" (Flamingo: the untrained model is its language model) or "ones"
    # (tanh(1) = 0.76: gates open, for a language model trained from scratch together with them)
    alpha_initializer: str = "zeros"
    resampler_n_latents: int = 64
    resampler_depth: int = 6
    resampler_n_heads: int = 16
    resampler_head_dim: int = 96
    vision_config: VisionConfig = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.vision_config is None:
            self.vision_config = VisionConfig(hidden_act="gelu", layer_norm_eps=1e-5)
        super().__post_init__()
        if self.expert_routing != ExpertRouting.IMAGE_CHUNK.value or self.position_ids != PositionIds.SEQUENTIAL.value:
            raise ConfigError("flamingo has no experts and no boi/eoi: use expert_routing=image_chunk, "
                              "position_ids=sequential")
        if self.num_key_value_heads != self.num_attention_heads:
            raise ConfigError("flamingo (Idefics) has no grouped-query attention: set num_key_value_heads to "
                              "num_attention_heads")
        if self.cross_layer_interval < 1 or self.num_hidden_layers % self.cross_layer_interval:
            raise ConfigError(f"cross_layer_interval must divide num_hidden_layers ({self.num_hidden_layers}), as "
                              f"Idefics indexes its blocks by layer // interval; got {self.cross_layer_interval}")
        if self.alpha_type not in ("float", "vector"):
            raise ConfigError(f"alpha_type must be 'float' or 'vector'; got {self.alpha_type!r}")
        if self.alpha_initializer not in ("zeros", "ones"):
            raise ConfigError(f"alpha_initializer must be 'zeros' or 'ones'; got {self.alpha_initializer!r}")
        for name in ("resampler_n_latents", "resampler_depth", "resampler_n_heads", "resampler_head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if not 0 <= self.image_token_id < self.vocab_size:
            raise ConfigError(f"image_token_id {self.image_token_id} is outside the vocabulary ({self.vocab_size})")

    @property
    def num_cross_layers(self) -> int:
        return self.num_hidden_layers // self.cross_layer_interval

    @classmethod
    def tiny(cls, **overrides: Any) -> "FlamingoConfig":
        base = dict(
            # "<image>" past the 320 pieces of the tests' tokenizer: no text token may be read as an image
            vocab_size=328, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256, image_token_id=327, cross_layer_interval=1,
            resampler_n_latents=4, resampler_depth=2, resampler_n_heads=2, resampler_head_dim=16,
            vision_config=VisionConfig(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96,
                                       num_hidden_layers=2, num_heads=4, hidden_act="gelu", layer_norm_eps=1e-5),
        )
        base.update(overrides)
        return cls(**base)


# ------------------------------------------------------------------ perceiver resampler
class PerceiverAttention(nn.Module):
    """Latents attend to [context; latents] (no biases, Flamingo's detail)."""

    def __init__(self, width: int, n_heads: int, head_dim: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.context_layer_norm = nn.LayerNorm(width)
        self.latents_layer_norm = nn.LayerNorm(width)
        self.q_proj = nn.Linear(width, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(width, n_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(width, n_heads * head_dim, bias=False)
        self.output_proj = nn.Linear(n_heads * head_dim, width, bias=False)

    def forward(self, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        context, latents = self.context_layer_norm(context), self.latents_layer_norm(latents)
        both = torch.cat((context, latents), dim=1)
        B = context.shape[0]
        q, k, v = (t.reshape(B, t.shape[1], self.n_heads, self.head_dim).transpose(1, 2)
                   for t in (self.q_proj(latents), self.k_proj(both), self.v_proj(both)))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.output_proj(out.transpose(1, 2).flatten(2))


class PerceiverMLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width, bias=False)
        self.c_proj = nn.Linear(4 * width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.fc(self.ln(x))))


class PerceiverResampler(nn.Module):
    """``connector`` part: ViT features [N, T, W] -> [N, n_latents, W]."""

    def __init__(self, c: FlamingoConfig):
        super().__init__()
        w = c.vision_config.hidden_size
        self.latents = nn.Parameter(torch.zeros(c.resampler_n_latents, w))
        self.blocks = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(w, c.resampler_n_heads, c.resampler_head_dim), PerceiverMLP(w)])
            for _ in range(c.resampler_depth))
        self.layer_norm = nn.LayerNorm(w)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        latents = self.latents.to(context.dtype).expand(context.shape[0], -1, -1)
        for attn, ff in self.blocks:
            latents = attn(context, latents) + latents
            latents = ff(latents) + latents
        return self.layer_norm(latents)


class ResamplerKeysValues(nn.Module):
    """``connector`` part: the resampler, then every gated block's keys and values of its latents
    ([N, n_latents, 2 * blocks * hidden], ``[K_0 | V_0 | K_1 | ...]``), computed once per image."""

    def __init__(self, resampler: PerceiverResampler, blocks: nn.ModuleList):
        super().__init__()
        self.resampler, self.blocks = resampler, blocks

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        latents = self.resampler(features)
        return torch.cat([t for b in self.blocks for t in (b.cross_attn.k_proj(latents), b.cross_attn.v_proj(latents))],
                         dim=-1)


class VisionEncoder(nn.Module):
    """``vision_encoder`` part: pixels -> the last layer's hidden states, CLS first."""

    def __init__(self, tower: CLIPVisionTower):
        super().__init__()
        self.tower = tower

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.tower.pre_layrnorm(self.tower.embeddings(pixel_values))
        for layer in self.tower.encoder.layers:
            x = layer(x)
        return x


# ------------------------------------------------------------------------ the decoder
class GatedCrossAttention(nn.Module):
    """Text queries attend to image memory (no RoPE, no cache of their own)."""

    def __init__(self, c: FlamingoConfig):
        super().__init__()
        h, w = c.hidden_size, c.vision_config.hidden_size
        self.num_heads, self.head_dim = c.num_attention_heads, c.head_dim
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(w, h, bias=False)
        self.v_proj = nn.Linear(w, h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        """Precomputed keys or values [Bm, M, hidden] -> [Bm, heads, M, head_dim]."""
        return t.reshape(t.shape[0], t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).reshape(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        # additive mask as transformers builds it: a row with no image attends uniformly (then is zeroed)
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, torch.finfo(q.dtype).min)
        out = F.scaled_dot_product_attention(q, k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1),
                                             attn_mask=bias[:, None])
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


class GatedCrossAttentionLayer(nn.Module):
    def __init__(self, c: FlamingoConfig):
        super().__init__()
        self.cross_attn = GatedCrossAttention(c)
        self.mlp = SwiGLU(c.hidden_size, c.intermediate_size)
        self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        shape = (1, 1, c.hidden_size) if c.alpha_type == "vector" else (1,)
        self.alpha_cross_attn = nn.Parameter(torch.zeros(shape))
        self.alpha_dense = nn.Parameter(torch.zeros(shape))

    def forward(self, x: torch.Tensor, cross: CrossAttention, index: int) -> torch.Tensor:
        """``cross.memory`` rows hold every block's keys and values (see ResamplerKeysValues)."""
        H = x.shape[-1]
        kv = cross.memory[..., 2 * index * H: 2 * (index + 1) * H].to(x.dtype)
        k, v = self.cross_attn.heads(kv[..., :H]), self.cross_attn.heads(kv[..., H:])
        a = self.cross_attn(self.input_layernorm(x), k, v, cross.mask())
        a = a.masked_fill(~cross.gate()[:, :, None], 0.0)
        x = x + torch.tanh(self.alpha_cross_attn) * a
        return x + torch.tanh(self.alpha_dense) * self.mlp(self.post_attention_layernorm(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: FlamingoConfig):
        super().__init__()
        self.self_attn = LlamaAttention(c)
        self.mlp = SwiGLU(c.hidden_size, c.intermediate_size)
        self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)

    def forward(self, x, cos, sin, route, cache, layer_idx, start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer_idx, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class IdeficsModel(nn.Module):
    def __init__(self, c: FlamingoConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.vision_model = CLIPVisionTower(c.vision_config)
        self.perceiver_resampler = PerceiverResampler(c)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.gated_cross_attn_layers = nn.ModuleList(GatedCrossAttentionLayer(c) for _ in range(c.num_cross_layers))
        self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)


# ------------------------------------------------------------------ the model
@register
class Flamingo(VLM):
    arch_name = "flamingo"
    hf_architectures = ("IdeficsForVisionText2Text",)
    config_class = FlamingoConfig
    gguf_arch = "llama"  # the text part's family; the model as a whole has no GGUF form (see the connector kind)
    has_experts = False
    image_placement = ImagePlacement.CROSS_ATTEND.value
    # the ViT's post_layernorm is kept (transformers loads it) but unused: Idefics applies it to the pooled output only
    checkpoint_ignored = (r".*\.rotary_emb\.(inv_freq|original_inv_freq)", r".*\.position_ids")

    def __init__(self, config: FlamingoConfig):
        super().__init__(config)
        self.model = IdeficsModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # --------------------------------------------------------------- config I/O
    @classmethod
    def tiny_config(cls, **overrides: Any) -> FlamingoConfig:
        return FlamingoConfig.tiny(**overrides)

    @classmethod
    def config_from_hf(cls, hf: dict[str, Any]) -> FlamingoConfig:
        vc = dict(hf.get("vision_config") or {})
        pc = dict(hf.get("perceiver_config") or {})
        rope = hf.get("rope_parameters") or {}
        if rope.get("rope_type", "default") not in ("default", None):
            raise ConfigError(f"idefics uses rope_type {rope.get('rope_type')!r}; only 'default' is supported")
        if not hf.get("use_resampler", False):
            raise ConfigError("this Idefics checkpoint has no perceiver resampler (use_resampler=false); vlmexport's "
                              "flamingo needs one")
        if hf.get("qk_layer_norms") or pc.get("qk_layer_norms_perceiver"):
            raise ConfigError("Idefics qk_layer_norms are not supported; use a checkpoint without them")
        if hf.get("additional_vocab_size", 0):
            raise ConfigError("Idefics additional_vocab_size > 0 (decoupled embeddings) is not supported; merge the "
                              "additional embeddings into the vocabulary first")
        vision = VisionConfig(
            image_size=vc.get("image_size", 224), patch_size=vc.get("patch_size", 14),
            hidden_size=vc.get("embed_dim", vc.get("hidden_size", 768)),
            intermediate_size=vc.get("intermediate_size", 5120), num_hidden_layers=vc.get("num_hidden_layers", 32),
            num_heads=vc.get("num_attention_heads", 16), layer_norm_eps=vc.get("layer_norm_eps", 1e-5),
            hidden_act=vc.get("hidden_act", "gelu"), in_channels=vc.get("num_channels", 3))
        heads = hf.get("num_attention_heads", 32)
        return FlamingoConfig(
            vocab_size=hf.get("vocab_size", 32000), hidden_size=hf.get("hidden_size", 4096),
            intermediate_size=hf.get("intermediate_size", 11008), num_hidden_layers=hf.get("num_hidden_layers", 32),
            num_attention_heads=heads, num_key_value_heads=heads, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            max_position_embeddings=hf.get("max_position_embeddings", 2048), hidden_act=hf.get("hidden_act", "silu"),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            bos_token_id=hf.get("bos_token_id") if hf.get("bos_token_id") is not None else 1,
            eos_token_id=hf.get("eos_token_id") if hf.get("eos_token_id") is not None else 2,
            pad_token_id=hf.get("pad_token_id") if hf.get("pad_token_id") is not None else 0,
            vision_config=vision, image_token_id=hf.get("image_token_id", 32000),
            cross_layer_interval=hf.get("cross_layer_interval", 1), alpha_type=hf.get("alpha_type", "float"),
            alpha_initializer=hf.get("alpha_initializer", "zeros") if hf.get("alpha_initializer") in ("zeros", "ones")
            else "zeros",  # ("normal" draws are already in the checkpoint; only a fresh init reads it)
            resampler_n_latents=pc.get("resampler_n_latents", 64), resampler_depth=pc.get("resampler_depth", 6),
            resampler_n_heads=pc.get("resampler_n_heads", 16), resampler_head_dim=pc.get("resampler_head_dim", 96))

    @classmethod
    def config_to_hf(cls, c: FlamingoConfig) -> dict[str, Any]:
        vc = c.vision_config
        return {
            "architectures": list(cls.hf_architectures), "model_type": "idefics",
            "vocab_size": c.vocab_size, "additional_vocab_size": 0, "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads, "hidden_act": c.hidden_act, "rms_norm_eps": c.rms_norm_eps,
            "rope_parameters": {"rope_theta": c.rope_theta, "rope_type": "default"},
            "max_position_embeddings": c.max_position_embeddings, "tie_word_embeddings": c.tie_word_embeddings,
            "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
            "image_token_id": c.image_token_id, "cross_layer_interval": c.cross_layer_interval,
            "alpha_type": c.alpha_type, "alpha_initializer": c.alpha_initializer, "qk_layer_norms": False,
            "use_resampler": True, "freeze_text_layers": False, "freeze_vision_layers": False,
            "perceiver_config": {"use_resampler": True, "resampler_n_latents": c.resampler_n_latents,
                                 "resampler_depth": c.resampler_depth, "resampler_n_heads": c.resampler_n_heads,
                                 "resampler_head_dim": c.resampler_head_dim, "qk_layer_norms_perceiver": False},
            "vision_config": {"embed_dim": vc.hidden_size, "image_size": vc.image_size, "patch_size": vc.patch_size,
                              "intermediate_size": vc.intermediate_size, "num_hidden_layers": vc.num_hidden_layers,
                              "num_attention_heads": vc.num_heads, "num_channels": vc.in_channels,
                              "hidden_act": vc.hidden_act, "layer_norm_eps": vc.layer_norm_eps},
        }

    # -------------------------------------------------------------------- hooks
    def vision_encoder_module(self) -> nn.Module:
        return VisionEncoder(self.model.vision_model)

    def connector_module(self) -> nn.Module:
        return ResamplerKeysValues(self.model.perceiver_resampler, self.model.gated_cross_attn_layers)

    def token_embedding(self) -> nn.Module:
        return self.model.embed_tokens

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.layers

    def final_norm(self) -> nn.Module:
        return self.model.norm

    def lm_head_module(self) -> nn.Module:
        return self.lm_head

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> the cross-attention memory [N, n_latents, 2 * blocks * hidden]: the resampled
        latents' keys and values for every gated block, computed once per image."""
        return self.connector_module()(self.vision_encoder_module()(pixel_values))

    def reset_special_parameters(self) -> None:
        nn.init.normal_(self.model.vision_model.embeddings.class_embedding, std=0.02)
        nn.init.normal_(self.model.perceiver_resampler.latents, std=0.02)
        init = nn.init.zeros_ if self.config.alpha_initializer == "zeros" else nn.init.ones_
        for block in self.model.gated_cross_attn_layers:  # zeros: tanh gates closed, the untrained model is its LM
            init(block.alpha_cross_attn)
            init(block.alpha_dense)

    def decode(self, inputs_embeds: torch.Tensor, token_type: torch.Tensor | None,
               position_ids: torch.Tensor, cache: KVCache | None = None, start: int | torch.Tensor = 0,
               last_only: bool = False, select: torch.Tensor | None = None,
               cross: CrossAttention | None = None) -> torch.Tensor:
        """The base decoder with a gated cross-attention block before every ``cross_layer_interval``-th layer.
        ``cross`` None: no image anywhere (the blocks' attention is gated off; their MLP still runs)."""
        if cross is None:
            cross = self.cross_attention(None, torch.full(position_ids.shape, -1, device=position_ids.device))
        cos, sin = rope_cos_sin(position_ids, self.rope_inv_freq, inputs_embeds.dtype)
        h = inputs_embeds
        interval = self.config.cross_layer_interval
        for i, layer in enumerate(self.model.layers):
            if i % interval == 0:
                h = self.model.gated_cross_attn_layers[i // interval](h, cross, i // interval)
            h = layer(h, cos, sin, None, cache, i, start)
        if cache is not None and isinstance(start, int):
            cache.length = start + inputs_embeds.shape[1]
        if last_only:
            h = h[:, -1:]
        elif select is not None:
            h = h.reshape(-1, h.shape[-1]).index_select(0, select)
        return self.lm_head(self.model.norm(h))

    @classmethod
    def default_chat_template(cls, config: FlamingoConfig | None = None) -> ChatTemplate:
        return ChatTemplate(jinja=FLAMINGO_CHAT_TEMPLATE, source="vlmexport:flamingo (idefics-instruct turn format)")

    @classmethod
    def part_specs(cls, c: FlamingoConfig) -> PartSpecs:
        vc = c.vision_config
        V, B = "model.vision_model.", "model.vision_model.encoder.layers.{i}."
        L, X, R = "model.layers.{i}.", "model.gated_cross_attn_layers.{i}.", "model.perceiver_resampler."
        n = vc.num_hidden_layers
        resampler = {"latents": R + "latents", "norm": R + "layer_norm.weight", "norm_bias": R + "layer_norm.bias"}
        for j in range(c.num_cross_layers):
            resampler[f"kv.{j}.k"] = X.format(i=j) + "cross_attn.k_proj.weight"
            resampler[f"kv.{j}.v"] = X.format(i=j) + "cross_attn.v_proj.weight"
        for d in range(c.resampler_depth):
            a, f = f"{R}blocks.{d}.0.", f"{R}blocks.{d}.1."
            resampler.update({
                f"{d}.context_norm": a + "context_layer_norm.weight", f"{d}.context_norm_bias": a + "context_layer_norm.bias",
                f"{d}.latents_norm": a + "latents_layer_norm.weight", f"{d}.latents_norm_bias": a + "latents_layer_norm.bias",
                f"{d}.q": a + "q_proj.weight", f"{d}.k": a + "k_proj.weight", f"{d}.v": a + "v_proj.weight",
                f"{d}.o": a + "output_proj.weight", f"{d}.mlp_norm": f + "ln.weight", f"{d}.mlp_norm_bias": f + "ln.bias",
                f"{d}.fc": f + "fc.weight", f"{d}.proj": f + "c_proj.weight"})
        return PartSpecs(
            vision=VisionSpec(
                image_size=vc.image_size, patch_size=vc.patch_size, hidden_size=vc.hidden_size,
                intermediate_size=vc.intermediate_size, num_layers=n, num_heads=vc.num_heads,
                layer_norm_eps=vc.layer_norm_eps, activation=vc.hidden_act, norm_placement="pre",
                patch_weight=V + "embeddings.patch_embedding.weight", patch_bias=None,
                cls=V + "embeddings.class_embedding", positions=V + "embeddings.position_embedding.weight",
                pre_norm=(V + "pre_layrnorm.weight", V + "pre_layrnorm.bias"),
                qkv=(B + "self_attn.q_proj.weight", B + "self_attn.k_proj.weight", B + "self_attn.v_proj.weight"),
                o=B + "self_attn.out_proj.weight", fc1=B + "mlp.fc1.weight", fc2=B + "mlp.fc2.weight",
                norm1=B + "layer_norm1.weight", norm2=B + "layer_norm2.weight",
                feature_layers=(n,), keep_cls=True),
            connector=ConnectorSpec(kind="perceiver", weights=resampler, activation="relu", layer_norm_eps=1e-5,
                                    settings={"n_latents": c.resampler_n_latents, "depth": c.resampler_depth,
                                           "n_heads": c.resampler_n_heads, "head_dim": c.resampler_head_dim,
                                           "num_blocks": c.num_cross_layers, "hidden": c.hidden_size}),
            decoder=DecoderSpec(
                num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
                vocab_size=c.vocab_size, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
                max_position_embeddings=c.max_position_embeddings,
                embed="model.embed_tokens.weight", final_norm="model.norm.weight",
                lm_head="model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight",
                attn_norm=L + "input_layernorm.weight", ffn_norm=L + "post_attention_layernorm.weight",
                language=ExpertNames(qkv=(L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight",
                                          L + "self_attn.v_proj.weight"),
                                     o=L + "self_attn.o_proj.weight", gate=L + "mlp.gate_proj.weight",
                                     up=L + "mlp.up_proj.weight", down=L + "mlp.down_proj.weight"),
                cross_attention=CrossAttentionSpec(
                    num_blocks=c.num_cross_layers, interval=c.cross_layer_interval,
                    memory_width=2 * c.num_cross_layers * c.hidden_size, memory_tokens=c.resampler_n_latents,
                    q=X + "cross_attn.q_proj.weight", o=X + "cross_attn.o_proj.weight",
                    gate=X + "mlp.gate_proj.weight", up=X + "mlp.up_proj.weight", down=X + "mlp.down_proj.weight",
                    attn_norm=X + "input_layernorm.weight", ffn_norm=X + "post_attention_layernorm.weight",
                    alpha_attn=X + "alpha_cross_attn", alpha_ffn=X + "alpha_dense",
                    placeholder_id=c.image_token_id)),
        )

    def parameter_role(self, name: str) -> str:
        # stage 1 (align) trains the resampler and the gated blocks, the language model frozen
        if name.startswith(("model.perceiver_resampler.", "model.gated_cross_attn_layers.")):
            return "connector"
        if name.startswith("model.vision_model."):
            return "vision"
        if name.startswith("model.embed_tokens"):
            return "embedding"
        return "language"
