"""``cogvlm``: EVA-CLIP ViT -> GLU connector with boi/eoi -> LLaMA with visual experts.

Module names are the tensor names of THUDM's ``CogVLMForCausalLM`` (cogvlm-chat-hf),
so real THUDM checkpoints load and llama.cpp's ``convert_hf_to_gguf.py`` reads what we
save. Every decoder layer holds a language expert and a visual expert of equal shapes
(QKV, attention output, SwiGLU MLP), chosen per position by ``token_type``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from ..core.layout import ExpertRouting, PositionIds
from ..core.preprocess import PreprocessConfig
from ..core.prompt import ChatTemplate
from .base import VLM, VisionConfig, VLMConfig, register
from .layers import RMSNorm, SwiGLU, ViTMLP, apply_rope, attention, routed, sincos_2d, vit_self_attention
from .spec import ConnectorSpec, DecoderSpec, ExpertNames, PartSpecs, VisionSpec


# THUDM cogvlm-chat-hf: build_conversation_input_ids puts [BOS] and the image tokens first, then
# tokenizer.encode(_history_to_prompt(template_version, history, query)) on its own:
#   base: the query alone (no history); chat / vqa: "Question: {q} Answer: {a}\n" per past turn,
#   then "Question: {query} Answer:" ("Short answer:" for vqa). No EOS between turns.
# A conversation that ends with an answer (training) ends with EOS.
COGVLM_CHAT_TEMPLATE = """\
{%- set version = "@VERSION@" -%}
{%- set answer_format = {"chat": "Answer:", "vqa": "Short answer:"}.get(version, "") -%}
{%- macro text(m) -%}
{%- if m.content is string %}{{ m.content }}{% else %}{% for c in m.content if c.type == 'text' %}{{ c.text }}{% endfor %}\
{% endif -%}
{%- endmacro -%}
{{- bos_token -}}
{#- images without a placeholder: right after BOS, as THUDM puts its image -#}
{%- for m in messages if m.role == 'user' and m.content is not string -%}
{%- for c in m.content if c.type == 'image' %}{{ '<image>' }}{% endfor -%}
{%- endfor -%}
{%- if version == 'base' -%}
{%- for m in messages -%}
{%- if m.role == 'user' and loop.index0 >= messages | length - 2 %}{{ text(m) }}\
{% elif m.role == 'assistant' and loop.last %}{% generation %}{{ ' ' + text(m) + eos_token }}{% endgeneration %}\
{% endif -%}
{%- endfor -%}
{%- else -%}
{%- for m in messages -%}
{%- if m.role == 'user' %}{{ 'Question: ' + text(m) + ' ' + answer_format }}\
{% elif m.role == 'assistant' %}{% generation %}{{ ' ' + text(m) }}{% if loop.last %}{{ eos_token }}{% endif %}\
{% endgeneration %}{% if not loop.last %}{{ '\\n' }}{% endif %}\
{% endif -%}
{%- endfor -%}
{%- endif -%}
"""
TEMPLATE_VERSIONS = ("base", "chat", "vqa")


@dataclass
class CogVLMConfig(VLMConfig):
    template_version: str = "chat"

    @classmethod
    def tiny(cls, **overrides: Any) -> "CogVLMConfig":
        """A few-hundred-kB model for tests."""
        base = dict(
            vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256,
            vision_config=VisionConfig(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96,
                                       num_hidden_layers=2, num_heads=4),
        )
        base.update(overrides)
        return cls(**base)


# ------------------------------------------------------------------ vision encoder
class PatchEmbedding(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(vc.in_channels, vc.hidden_size, kernel_size=vc.patch_size, stride=vc.patch_size)
        self.cls_embedding = nn.Parameter(torch.zeros(1, vc.hidden_size))
        self.position_embedding = nn.Embedding(vc.num_positions, vc.hidden_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.proj(images).flatten(2).transpose(1, 2)  # [B, n_patches, D]
        cls = self.cls_embedding.expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat((cls, x), dim=1)  # CLS first, as the original (llama.cpp puts it last)
        return x + self.position_embedding.weight.to(x.dtype)


class EVAAttention(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.num_heads = vc.num_heads
        self.query_key_value = nn.Linear(vc.hidden_size, vc.hidden_size * 3)
        self.dense = nn.Linear(vc.hidden_size, vc.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.query_key_value(x).chunk(3, dim=-1)
        return self.dense(vit_self_attention(x, q, k, v, self.num_heads))


class EVALayer(nn.Module):
    """Post-norm block: x + LN(attn(x)), then x + LN(mlp(x))."""

    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)
        self.attention = EVAAttention(vc)
        self.mlp = ViTMLP(vc.hidden_size, vc.intermediate_size, vc.hidden_act)
        self.post_attention_layernorm = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.input_layernorm(self.attention(x))
        return x + self.post_attention_layernorm(self.mlp(x))


class EVATransformer(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(EVALayer(vc) for _ in range(vc.num_hidden_layers))


class GLU(nn.Module):
    """CogVLM's connector: linear -> LayerNorm -> GELU -> SwiGLU(gate, h_to_4h) -> 4h_to_h."""

    def __init__(self, config: CogVLMConfig, in_features: int):
        super().__init__()
        self.linear_proj = nn.Linear(in_features, config.hidden_size, bias=False)
        self.norm1 = nn.LayerNorm(config.hidden_size)
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(F.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))


class EVA2CLIPModel(nn.Module):
    def __init__(self, config: CogVLMConfig):
        super().__init__()
        vc = config.vision_config
        self.patch_embedding = PatchEmbedding(vc)
        self.transformer = EVATransformer(vc)
        self.linear_proj = GLU(config, vc.hidden_size)
        self.boi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.eoi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))


class VisionEncoder(nn.Module):
    """``vision_encoder`` part: pixels [N,3,H,W] -> patch features [N, n_patches, Dv] (CLS dropped)."""

    def __init__(self, vision: EVA2CLIPModel):
        super().__init__()
        self.patch_embedding = vision.patch_embedding
        self.transformer = vision.transformer

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values)
        for layer in self.transformer.layers:
            x = layer(x)
        return x[:, 1:]


class Connector(nn.Module):
    """``connector`` part: patch features -> [N, boi + n_patches + eoi, hidden]."""

    def __init__(self, vision: EVA2CLIPModel):
        super().__init__()
        self.linear_proj = vision.linear_proj
        self.boi = vision.boi
        self.eoi = vision.eoi

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.linear_proj(features)
        n = x.shape[0]
        return torch.cat((self.boi.expand(n, -1, -1).to(x.dtype), x, self.eoi.expand(n, -1, -1).to(x.dtype)), dim=1)


# ---------------------------------------------------------------- expert decoder
class VisionExpertAttention(nn.Module):
    def __init__(self, config: CogVLMConfig):
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.vision_expert_query_key_value = nn.Linear(h, 3 * h, bias=False)
        self.vision_expert_dense = nn.Linear(h, h, bias=False)
        self.language_expert_query_key_value = nn.Linear(h, 3 * h, bias=False)
        self.language_expert_dense = nn.Linear(h, h, bias=False)

    def forward(self, x, cos, sin, route, cache, layer_idx, start):
        B, L, H = x.shape
        qkv = routed(route, x, self.language_expert_query_key_value, self.vision_expert_query_key_value)
        q, k, v = (t.reshape(B, L, self.num_heads, self.head_dim) for t in qkv.split(H, dim=-1))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer_idx, start, k, v)
        out = attention(q, k, v, start).transpose(1, 2).reshape(B, L, H)
        return routed(route, out, self.language_expert_dense, self.vision_expert_dense)


class VisionExpertMLP(nn.Module):
    def __init__(self, config: CogVLMConfig):
        super().__init__()
        self.language_mlp = SwiGLU(config.hidden_size, config.intermediate_size)
        self.vision_mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, route):
        return routed(route, x, self.language_mlp, self.vision_mlp)


class CogVLMDecoderLayer(nn.Module):
    def __init__(self, config: CogVLMConfig):
        super().__init__()
        self.self_attn = VisionExpertAttention(config)
        self.mlp = VisionExpertMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, cos, sin, route, cache, layer_idx, start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, route, cache, layer_idx, start)
        return x + self.mlp(self.post_attention_layernorm(x), route)


class CogVLMModel(nn.Module):
    def __init__(self, config: CogVLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(CogVLMDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.vision = EVA2CLIPModel(config)


# ------------------------------------------------------------------ the model
@register
class CogVLM(VLM):
    arch_name = "cogvlm"
    hf_architectures = ("CogVLMForCausalLM",)
    config_class = CogVLMConfig
    gguf_arch = "cogvlm"
    has_experts = True
    # THUDM checkpoints carry RoPE tables that we recompute.
    checkpoint_ignored = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)

    def __init__(self, config: CogVLMConfig):
        super().__init__(config)
        if config.num_key_value_heads != config.num_attention_heads:
            from ..core.errors import ConfigError

            raise ConfigError("cogvlm's fused expert QKV needs num_key_value_heads == num_attention_heads")
        self.model = CogVLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # --------------------------------------------------------------- config I/O
    @classmethod
    def tiny_config(cls, **overrides: Any) -> CogVLMConfig:
        return CogVLMConfig.tiny(**overrides)

    @classmethod
    def config_from_hf(cls, hf: dict[str, Any]) -> CogVLMConfig:
        semantics_default = (
            # A config without our semantics fields is an original THUDM checkpoint.
            ExpertRouting.HF_COGVLM.value if "expert_routing" not in hf else hf["expert_routing"],
            PositionIds.HF_COGVLM.value if "position_ids" not in hf else hf["position_ids"],
        )
        vc = dict(hf.get("vision_config") or {})
        vision = VisionConfig(
            image_size=vc.get("image_size", 224), patch_size=vc.get("patch_size", 14),
            hidden_size=vc.get("hidden_size", 1792), intermediate_size=vc.get("intermediate_size", 15360),
            num_hidden_layers=vc.get("num_hidden_layers", 63), num_heads=vc.get("num_heads", 16),
            layer_norm_eps=vc.get("layer_norm_eps", 1e-6), hidden_act=vc.get("hidden_act", "gelu"),
            in_channels=vc.get("in_channels", 3),
        )
        return CogVLMConfig(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads"), rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=hf.get("rope_theta", 10000.0), max_position_embeddings=hf.get("max_position_embeddings", 2048),
            hidden_act=hf.get("hidden_act", "silu"), tie_word_embeddings=hf.get("tie_word_embeddings", False),
            bos_token_id=hf.get("bos_token_id", 1), eos_token_id=hf.get("eos_token_id", 2),
            pad_token_id=hf.get("pad_token_id", 0), vision_config=vision,
            expert_routing=semantics_default[0], position_ids=semantics_default[1],
            template_version=hf.get("template_version", "chat"),
        )

    @classmethod
    def config_to_hf(cls, c: CogVLMConfig) -> dict[str, Any]:
        vc = c.vision_config
        return {
            "architectures": list(cls.hf_architectures),
            "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
            # not in THUDM's config, but llama.cpp's converter needs it
            "num_key_value_heads": c.num_key_value_heads,
            "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
            "max_position_embeddings": c.max_position_embeddings, "hidden_act": c.hidden_act,
            "tie_word_embeddings": c.tie_word_embeddings, "bos_token_id": c.bos_token_id,
            "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
            "template_version": c.template_version,
            "expert_routing": c.expert_routing, "position_ids": c.position_ids,
            "vision_config": {
                "dropout_prob": 0.0, "hidden_act": vc.hidden_act, "in_channels": vc.in_channels,
                "num_hidden_layers": vc.num_hidden_layers, "hidden_size": vc.hidden_size,
                "patch_size": vc.patch_size, "num_heads": vc.num_heads, "intermediate_size": vc.intermediate_size,
                "layer_norm_eps": vc.layer_norm_eps, "num_positions": vc.num_positions,
                "image_size": vc.image_size,
            },
        }

    # -------------------------------------------------------------------- hooks
    def vision_encoder_module(self) -> nn.Module:
        return VisionEncoder(self.model.vision)

    def connector_module(self) -> nn.Module:
        return Connector(self.model.vision)

    def token_embedding(self) -> nn.Module:
        return self.model.embed_tokens

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.layers

    def final_norm(self) -> nn.Module:
        return self.model.norm

    def lm_head_module(self) -> nn.Module:
        return self.lm_head

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.connector_module()(self.vision_encoder_module()(pixel_values))

    def reset_special_parameters(self) -> None:
        v = self.model.vision
        nn.init.normal_(v.patch_embedding.cls_embedding, std=0.02)
        # patch positions start as a 2-D sin-cos table (as in MAE): from-scratch training
        # then gets the spatial layout the position questions need from step one
        with torch.no_grad():
            pos = v.patch_embedding.position_embedding.weight
            grid = self.config.vision_config.image_size // self.config.vision_config.patch_size
            if pos.shape[1] % 4 == 0:
                pos[1:] = sincos_2d(grid, pos.shape[1]).to(pos.dtype)
        nn.init.normal_(v.boi, std=0.02)
        nn.init.normal_(v.eoi, std=0.02)

    @classmethod
    def default_preprocess(cls, config: CogVLMConfig) -> PreprocessConfig:
        """THUDM's transform (its checkpoints ship no preprocessor_config.json): torchvision
        Resize((s, s), BICUBIC) of the PIL image, ToTensor (x / 255 in float32), CLIP mean/std."""
        return PreprocessConfig(image_size=config.vision_config.image_size, resample="bicubic", resize_mode="squash",
                                rescale="float32_div")

    @classmethod
    def default_chat_template(cls, config: CogVLMConfig | None = None) -> ChatTemplate:
        """THUDM's prompt format for ``template_version`` (base / chat / vqa), as jinja."""
        version = config.template_version if config is not None else "chat"
        if version not in TEMPLATE_VERSIONS:
            raise ConfigError(f"template_version {version!r} is unknown; THUDM's CogVLM knows {list(TEMPLATE_VERSIONS)}")
        # THUDM tokenizes the text apart from the image tokens it puts after BOS
        return ChatTemplate(jinja=COGVLM_CHAT_TEMPLATE.replace("@VERSION@", version), encode_runs_apart=True,
                            source=f"vlmexport:cogvlm (THUDM template_version={version})")

    @classmethod
    def part_specs(cls, c: CogVLMConfig) -> PartSpecs:
        vc = c.vision_config
        L = "model.layers.{i}."
        V = "model.vision."
        B = V + "transformer.layers.{i}."

        def expert(prefix_attn: str, mlp: str) -> ExpertNames:
            return ExpertNames(qkv=f"{L}self_attn.{prefix_attn}_query_key_value.weight",
                               o=f"{L}self_attn.{prefix_attn}_dense.weight",
                               gate=f"{L}mlp.{mlp}.gate_proj.weight", up=f"{L}mlp.{mlp}.up_proj.weight",
                               down=f"{L}mlp.{mlp}.down_proj.weight")

        return PartSpecs(
            vision=VisionSpec(
                image_size=vc.image_size, patch_size=vc.patch_size, hidden_size=vc.hidden_size,
                intermediate_size=vc.intermediate_size, num_layers=vc.num_hidden_layers, num_heads=vc.num_heads,
                layer_norm_eps=vc.layer_norm_eps, activation=vc.hidden_act, norm_placement="post",
                patch_weight=V + "patch_embedding.proj.weight", patch_bias=V + "patch_embedding.proj.bias",
                cls=V + "patch_embedding.cls_embedding", positions=V + "patch_embedding.position_embedding.weight",
                pre_norm=None, qkv=B + "attention.query_key_value.weight", o=B + "attention.dense.weight",
                fc1=B + "mlp.fc1.weight", fc2=B + "mlp.fc2.weight", norm1=B + "input_layernorm.weight",
                norm2=B + "post_attention_layernorm.weight", feature_layers=(vc.num_hidden_layers,), keep_cls=False),
            connector=ConnectorSpec(
                kind="glu", activation="gelu", layer_norm_eps=1e-5, boi=V + "boi", eoi=V + "eoi",
                weights={"linear": V + "linear_proj.linear_proj.weight", "norm": V + "linear_proj.norm1.weight",
                         "norm_bias": V + "linear_proj.norm1.bias", "gate": V + "linear_proj.gate_proj.weight",
                         "up": V + "linear_proj.dense_h_to_4h.weight", "down": V + "linear_proj.dense_4h_to_h.weight"}),
            decoder=DecoderSpec(
                num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
                vocab_size=c.vocab_size, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
                max_position_embeddings=c.max_position_embeddings, embed="model.embed_tokens.weight",
                final_norm="model.norm.weight",
                lm_head="model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight",
                attn_norm=L + "input_layernorm.weight", ffn_norm=L + "post_attention_layernorm.weight",
                language=expert("language_expert", "language_mlp"), vision=expert("vision_expert", "vision_mlp")),
        )

    def parameter_role(self, name: str) -> str:
        if name.startswith("model.vision.linear_proj") or name in ("model.vision.boi", "model.vision.eoi"):
            return "connector"
        if name.startswith("model.vision."):
            return "vision"
        if ".vision_expert_" in name or ".vision_mlp." in name:
            return "visual_expert"
        if name.startswith("model.embed_tokens"):
            return "embedding"
        return "language"

    def iter_visual_expert_pairs(self) -> Iterator[tuple[nn.Module, nn.Module]]:
        for layer in self.model.layers:
            a, m = layer.self_attn, layer.mlp
            yield a.language_expert_query_key_value, a.vision_expert_query_key_value
            yield a.language_expert_dense, a.vision_expert_dense
            yield m.language_mlp, m.vision_mlp
