"""``llava``: CLIP ViT (pre-norm) -> 2-layer MLP projector -> plain LLaMA (no experts).

Module names are those transformers' ``LlavaForConditionalGeneration`` writes with
``save_pretrained`` (transformers 5: ``vision_tower.*``, ``multi_modal_projector.*``,
``language_model.model.*``, ``language_model.lm_head``); the other spellings found in
published checkpoints are aliases, one per line, in ``checkpoint_aliases``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.layout import ExpertRouting, PositionIds
from ..core.prompt import ChatTemplate
from .base import VLM, VisionConfig, VLMConfig, register
from .layers import RMSNorm, SwiGLU, ViTMLP, activation, apply_rope, attention, vit_self_attention
from .spec import ConnectorSpec, DecoderSpec, ExpertNames, PartSpecs, VisionSpec


# llava-hf/llava-1.5-7b-hf chat_template.json (transformers' processor renders it)
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@dataclass
class LlavaConfig(VLMConfig):
    image_token_index: int = 32000
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: str = "default"  # "default" drops CLS, "full" keeps it
    head_dim_override: int | None = None
    vision_config: VisionConfig = field(default_factory=lambda: VisionConfig(hidden_act="quick_gelu", layer_norm_eps=1e-5))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.expert_routing != ExpertRouting.IMAGE_CHUNK.value or self.position_ids != PositionIds.SEQUENTIAL.value:
            raise ConfigError("llava has no experts and no boi/eoi: use expert_routing=image_chunk, position_ids=sequential")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ConfigError("vision_feature_select_strategy must be 'default' or 'full'")

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_attention_heads

    @classmethod
    def tiny(cls, **overrides: Any) -> "LlavaConfig":
        base = dict(
            vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, image_token_index=319,
            vision_config=VisionConfig(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96,
                                       num_hidden_layers=2, num_heads=4, hidden_act="quick_gelu",
                                       layer_norm_eps=1e-5),
        )
        base.update(overrides)
        return cls(**base)


# ------------------------------------------------------------------- CLIP tower
class CLIPEmbeddings(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(vc.hidden_size))
        self.patch_embedding = nn.Conv2d(vc.in_channels, vc.hidden_size, vc.patch_size, vc.patch_size, bias=False)
        self.position_embedding = nn.Embedding(vc.num_positions, vc.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat((cls, x), dim=1) + self.position_embedding.weight.to(x.dtype)


class CLIPAttention(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        d = vc.hidden_size
        self.num_heads = vc.num_heads
        self.k_proj, self.v_proj, self.q_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(vit_self_attention(x, self.q_proj(x), self.k_proj(x), self.v_proj(x), self.num_heads))


class CLIPLayer(nn.Module):
    """Pre-norm block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.self_attn = CLIPAttention(vc)
        self.layer_norm1 = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)
        self.mlp = ViTMLP(vc.hidden_size, vc.intermediate_size, vc.hidden_act)
        self.layer_norm2 = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPLayer(vc) for _ in range(vc.num_hidden_layers))


class CLIPVisionTower(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(vc)
        self.pre_layrnorm = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)
        self.encoder = CLIPEncoder(vc)
        self.post_layernorm = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)


class VisionEncoder(nn.Module):
    """``vision_encoder`` part: pixels -> the selected hidden states (CLS dropped for 'default')."""

    def __init__(self, tower: CLIPVisionTower, config: LlavaConfig):
        super().__init__()
        self.tower = tower
        n = config.vision_config.num_hidden_layers
        layers = config.vision_feature_layer if isinstance(config.vision_feature_layer, list) else [config.vision_feature_layer]
        # hidden_states[0] is the embedding output; hidden_states[i] the output of layer i
        self.feature_layers = [layer % (n + 1) for layer in layers]
        self.keep_cls = config.vision_feature_select_strategy == "full"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.tower.pre_layrnorm(self.tower.embeddings(pixel_values))
        states = [x]
        for layer in self.tower.encoder.layers[: max(self.feature_layers)]:
            x = layer(x)
            states.append(x)
        feats = torch.cat([states[i] for i in self.feature_layers], dim=-1)
        return feats if self.keep_cls else feats[:, 1:]


class MultiModalProjector(nn.Module):
    def __init__(self, config: LlavaConfig):
        super().__init__()
        layers = config.vision_feature_layer if isinstance(config.vision_feature_layer, list) else [0]
        d_in = config.vision_config.hidden_size * len(layers)
        self.linear_1 = nn.Linear(d_in, config.hidden_size, bias=config.multimodal_projector_bias)
        self.act = activation(config.projector_hidden_act)
        self.linear_2 = nn.Linear(config.hidden_size, config.hidden_size, bias=config.multimodal_projector_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


# --------------------------------------------------------------------- LLaMA
class LlamaAttention(nn.Module):
    """LLaMA attention; with ``config.attention_bias`` (a config that has it, e.g. internvl's Qwen2
    decoder) the q/k/v projections carry biases, which is Qwen2's attention."""

    def __init__(self, config: VLMConfig):
        super().__init__()
        h, hd, b = config.hidden_size, config.head_dim, bool(getattr(config, "attention_bias", False))
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.q_proj = nn.Linear(h, self.num_heads * hd, bias=b)
        self.k_proj = nn.Linear(h, self.num_kv_heads * hd, bias=b)
        self.v_proj = nn.Linear(h, self.num_kv_heads * hd, bias=b)
        self.o_proj = nn.Linear(self.num_heads * hd, h, bias=False)

    def forward(self, x, cos, sin, cache, layer_idx, start):
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, L, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, L, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer_idx, start, k, v)
        return self.o_proj(attention(q, k, v, start).transpose(1, 2).reshape(B, L, -1))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlavaConfig):
        super().__init__()
        self.self_attn = LlamaAttention(config)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, cos, sin, route, cache, layer_idx, start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer_idx, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlavaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlavaConfig):
        super().__init__()
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight


class LlamaDecoderHooks:
    """The VLM decoder hooks of a model whose ``language_model`` is a :class:`LlamaForCausalLM`
    (llava, blip2, internvl): one place instead of four accessors per architecture."""

    def token_embedding(self) -> nn.Module:
        return self.language_model.model.embed_tokens

    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.model.layers

    def final_norm(self) -> nn.Module:
        return self.language_model.model.norm

    def lm_head_module(self) -> nn.Module:
        return self.language_model.lm_head


# ------------------------------------------------------------------ the model
@register
class Llava(LlamaDecoderHooks, VLM):
    arch_name = "llava"
    hf_architectures = ("LlavaForConditionalGeneration",)
    config_class = LlavaConfig
    gguf_arch = "llama"
    has_experts = False
    checkpoint_aliases = (
        (r"vision_tower\.vision_model\.(.*)", r"vision_tower.\1"),  # llava-hf checkpoints, transformers 4.x
        (r"model\.vision_tower\.vision_model\.(.*)", r"vision_tower.\1"),  # transformers 4.52+ module layout
        (r"model\.vision_tower\.(.*)", r"vision_tower.\1"),  # transformers 5 module layout
        (r"model\.multi_modal_projector\.(.*)", r"multi_modal_projector.\1"),  # transformers 4.52+ module layout
        (r"model\.language_model\.(.*)", r"language_model.model.\1"),  # transformers 4.52+ module layout
        (r"lm_head\.weight", r"language_model.lm_head.weight"),  # transformers 4.52+ module layout
    )
    checkpoint_ignored = (r".*\.rotary_emb\.inv_freq", r"vision_tower\.embeddings\.position_ids")

    def __init__(self, config: LlavaConfig):
        super().__init__(config)
        self.vision_tower = CLIPVisionTower(config.vision_config)
        self.multi_modal_projector = MultiModalProjector(config)
        self.language_model = LlamaForCausalLM(config)

    # --------------------------------------------------------------- config I/O
    @classmethod
    def tiny_config(cls, **overrides: Any) -> LlavaConfig:
        return LlavaConfig.tiny(**overrides)

    @classmethod
    def config_from_hf(cls, hf: dict[str, Any]) -> LlavaConfig:
        tc = dict(hf.get("text_config") or {})
        vc = dict(hf.get("vision_config") or {})
        rope = tc.get("rope_parameters") or {}
        if rope.get("rope_type", "default") not in ("default", None):
            raise ConfigError(f"llava text_config uses rope_type {rope.get('rope_type')!r}; only 'default' is supported")
        vision = VisionConfig(
            image_size=vc.get("image_size", 336), patch_size=vc.get("patch_size", 14),
            hidden_size=vc.get("hidden_size", 1024), intermediate_size=vc.get("intermediate_size", 4096),
            num_hidden_layers=vc.get("num_hidden_layers", 24), num_heads=vc.get("num_attention_heads", 16),
            layer_norm_eps=vc.get("layer_norm_eps", 1e-5), hidden_act=vc.get("hidden_act", "quick_gelu"),
            in_channels=vc.get("num_channels", 3),
        )
        hidden = tc.get("hidden_size", 4096)
        heads = tc.get("num_attention_heads", 32)
        head_dim = tc.get("head_dim")
        return LlavaConfig(
            vocab_size=tc.get("vocab_size", 32000), hidden_size=hidden,
            intermediate_size=tc.get("intermediate_size", 11008), num_hidden_layers=tc.get("num_hidden_layers", 32),
            num_attention_heads=heads, num_key_value_heads=tc.get("num_key_value_heads"),
            rms_norm_eps=tc.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", tc.get("rope_theta", 10000.0)),
            max_position_embeddings=tc.get("max_position_embeddings", 4096),
            hidden_act=tc.get("hidden_act", "silu"),
            tie_word_embeddings=tc.get("tie_word_embeddings", hf.get("tie_word_embeddings", False)),
            bos_token_id=tc.get("bos_token_id") if tc.get("bos_token_id") is not None else 1,
            eos_token_id=tc.get("eos_token_id") if tc.get("eos_token_id") is not None else 2,
            pad_token_id=tc.get("pad_token_id") if tc.get("pad_token_id") is not None else 0,
            vision_config=vision,
            image_token_index=hf.get("image_token_index", hf.get("image_token_id", 32000)),
            projector_hidden_act=hf.get("projector_hidden_act", "gelu"),
            multimodal_projector_bias=hf.get("multimodal_projector_bias", True),
            vision_feature_layer=hf.get("vision_feature_layer", -2),
            vision_feature_select_strategy=hf.get("vision_feature_select_strategy", "default"),
            head_dim_override=head_dim if head_dim and head_dim != hidden // heads else None,
        )

    @classmethod
    def config_to_hf(cls, c: LlavaConfig) -> dict[str, Any]:
        vc = c.vision_config
        return {
            "architectures": list(cls.hf_architectures),
            "model_type": "llava",
            "image_token_index": c.image_token_index,
            "image_seq_length": vc.num_patches + (1 if c.vision_feature_select_strategy == "full" else 0),
            "projector_hidden_act": c.projector_hidden_act,
            "multimodal_projector_bias": c.multimodal_projector_bias,
            "vision_feature_layer": c.vision_feature_layer,
            "vision_feature_select_strategy": c.vision_feature_select_strategy,
            "tie_word_embeddings": c.tie_word_embeddings,
            "text_config": {
                "model_type": "llama", "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
                "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
                "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
                "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
                "rope_parameters": {"rope_theta": c.rope_theta, "rope_type": "default"},
                "max_position_embeddings": c.max_position_embeddings, "hidden_act": c.hidden_act,
                "tie_word_embeddings": c.tie_word_embeddings, "bos_token_id": c.bos_token_id,
                "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
                "attention_bias": False, "mlp_bias": False,
            },
            "vision_config": {
                "model_type": "clip_vision_model", "hidden_size": vc.hidden_size,
                "intermediate_size": vc.intermediate_size, "num_hidden_layers": vc.num_hidden_layers,
                "num_attention_heads": vc.num_heads, "image_size": vc.image_size, "patch_size": vc.patch_size,
                "layer_norm_eps": vc.layer_norm_eps, "hidden_act": vc.hidden_act, "num_channels": vc.in_channels,
            },
        }

    # -------------------------------------------------------------------- hooks
    def vision_encoder_module(self) -> nn.Module:
        return VisionEncoder(self.vision_tower, self.config)

    def connector_module(self) -> nn.Module:
        return self.multi_modal_projector

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.multi_modal_projector(self.vision_encoder_module()(pixel_values))

    def reset_special_parameters(self) -> None:
        nn.init.normal_(self.vision_tower.embeddings.class_embedding, std=0.02)

    @classmethod
    def default_chat_template(cls, config: LlavaConfig | None = None) -> ChatTemplate:
        """llava-hf/llava-1.5-7b-hf's chat template, verbatim: "USER: <image>\n{question} ASSISTANT:"."""
        return ChatTemplate(jinja=LLAVA_CHAT_TEMPLATE, source="vlmexport:llava (llava-hf/llava-1.5-7b-hf)")

    @classmethod
    def part_specs(cls, c: LlavaConfig) -> PartSpecs:
        vc = c.vision_config
        L = "language_model.model.layers.{i}."
        V = "vision_tower."
        B = V + "encoder.layers.{i}."
        layers = c.vision_feature_layer if isinstance(c.vision_feature_layer, list) else [c.vision_feature_layer]
        n = vc.num_hidden_layers
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
                feature_layers=tuple(x % (n + 1) for x in layers),
                keep_cls=c.vision_feature_select_strategy == "full"),
            connector=ConnectorSpec(
                kind="mlp", activation=c.projector_hidden_act,
                weights={"linear_1": "multi_modal_projector.linear_1.weight",
                         "linear_2": "multi_modal_projector.linear_2.weight",
                         **({"linear_1_bias": "multi_modal_projector.linear_1.bias",
                             "linear_2_bias": "multi_modal_projector.linear_2.bias"}
                            if c.multimodal_projector_bias else {})}),
            decoder=DecoderSpec(
                num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
                vocab_size=c.vocab_size, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
                max_position_embeddings=c.max_position_embeddings,
                embed="language_model.model.embed_tokens.weight", final_norm="language_model.model.norm.weight",
                lm_head=("language_model.model.embed_tokens.weight" if c.tie_word_embeddings
                         else "language_model.lm_head.weight"),
                attn_norm=L + "input_layernorm.weight", ffn_norm=L + "post_attention_layernorm.weight",
                language=ExpertNames(qkv=(L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight",
                                          L + "self_attn.v_proj.weight"),
                                     o=L + "self_attn.o_proj.weight", gate=L + "mlp.gate_proj.weight",
                                     up=L + "mlp.up_proj.weight", down=L + "mlp.down_proj.weight")),
        )

    def parameter_role(self, name: str) -> str:
        if name.startswith("multi_modal_projector."):
            return "connector"
        if name.startswith("vision_tower."):
            return "vision"
        if name.startswith("language_model.model.embed_tokens"):
            return "embedding"
        return "language"
