"""``blip2``: BLIP-2's ViT -> Q-Former (learned queries) -> linear projection -> LLaMA (the
BLIP-2 / MiniGPT-4 family).

Module names are those transformers' ``Blip2ForConditionalGeneration`` writes with
``save_pretrained`` (transformers 5, with a LLaMA text config): ``vision_model.*``,
``query_tokens``, ``qformer.*``, ``language_projection.*``, ``language_model.model.*``,
``language_model.lm_head``.

- ViT: patch conv (with bias), CLS first, learned positions ``[1, n+1, D]``, pre-norm blocks
  with one fused ``qkv`` projection (transformers 5 stores its bias fused too, ``[3D]``: the
  original's q_bias / zero k / v_bias), ``post_layernorm`` on the output; CLS is kept, the
  Q-Former attends to every token.
- Q-Former: ``query_tokens`` -> LayerNorm -> BERT-style post-norm layers (self-attention on the
  queries; cross-attention to the image features in layers 0, f, 2f, ... with
  f = ``cross_attention_frequency``; the query FFN ``intermediate_query`` / ``output_query``).
- One image becomes ``num_query_tokens`` embeddings; as transformers' ``Blip2Processor`` does,
  the image tokens go before BOS (``image_token_index`` marks them in ``input_ids``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from ..core.layout import ExpertRouting, PositionIds
from ..core.prompt import ChatTemplate
from .base import VLM, VisionConfig, VLMConfig, register
from .connectors.qformer import layer_roles
from .layers import ViTMLP, activation, vit_self_attention
from .llava import LlamaDecoderHooks, LlamaForCausalLM
from .spec import (
    ConnectorSpec,
    DecoderSpec,
    ExpertNames,
    PartSpecs,
    VisionSpec,
    bias_of,
)

# BLIP-2 (Salesforce/blip2-*): "Question: {q} Answer:" after the image tokens and BOS, as the
# transformers docs prompt it; earlier turns as " {a}" with a space-separated next question.
# MiniGPT-4 (Vision-CAIR, CONV_VISION_Vicuna0): system + "###", then
# "Human: <Img><ImageHere></Img> {q}###Assistant:"; each text run around an image is tokenized
# on its own (BOS on the first only), as its get_context_emb does. An answer ends with EOS (the
# runtimes stop there; MiniGPT-4 stops at "###", which separates earlier turns here).
BLIP2_CHAT_TEMPLATE = """\
{%- set version = "@VERSION@" -%}
{%- macro text(m) -%}
{%- if m.content is string %}{{ m.content }}{% else %}{% for c in m.content if c.type == 'text' %}{{ c.text }}{% endfor %}\
{% endif -%}
{%- endmacro -%}
{%- macro images(m) -%}
{%- if m.content is not string %}{% for c in m.content if c.type == 'image' %}{{ '@IMAGE@' }}{% endfor %}{% endif -%}
{%- endmacro -%}
{%- if version == 'minigpt4' -%}
{{- bos_token -}}
{%- set ns = namespace(system=false) -%}
{%- for m in messages if m.role == 'system' %}{{ text(m) }}{% set ns.system = true %}{% endfor -%}
{%- if not ns.system %}{{ 'Give the following image: <Img>ImageContent</Img>. You will be able to see the image once \
I provide it to you. Please answer my questions.' }}{% endif -%}
{%- for m in messages if m.role != 'system' -%}
{%- if m.role == 'user' %}{{ '###Human: ' }}{% if images(m) %}{{ '<Img>' + images(m) + '</Img> ' }}{% endif %}\
{{ text(m) + '###Assistant:' }}\
{% elif m.role == 'assistant' %}{% generation %}{{ ' ' + text(m) }}{% if loop.last %}{{ eos_token }}{% endif %}\
{% endgeneration %}{% endif -%}
{%- endfor -%}
{%- else -%}
{#- transformers' Blip2Processor: every image's tokens first, then BOS and the text -#}
{%- for m in messages if m.role == 'user' %}{{ images(m) }}{% endfor -%}
{{- bos_token -}}
{%- for m in messages if m.role != 'system' -%}
{%- if m.role == 'user' %}{% if not loop.first %}{{ ' ' }}{% endif %}{{ 'Question: ' + text(m) + ' Answer:' }}\
{% elif m.role == 'assistant' %}{% generation %}{{ ' ' + text(m) }}{% if loop.last %}{{ eos_token }}{% endif %}\
{% endgeneration %}{% endif -%}
{%- endfor -%}
{%- endif -%}
"""
TEMPLATE_VERSIONS = {"blip2": "<image>", "minigpt4": "<ImageHere>"}  # version -> its image placeholder


@dataclass
class QFormerConfig:
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    cross_attention_frequency: int = 2

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"qformer hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                              f"{self.num_attention_heads}")
        if self.cross_attention_frequency < 1 or self.num_hidden_layers < 1:
            raise ConfigError("qformer num_hidden_layers and cross_attention_frequency must be at least 1")


@dataclass
class Blip2Config(VLMConfig):
    image_token_index: int = 32000
    num_query_tokens: int = 32
    template_version: str = "blip2"
    head_dim_override: int | None = None
    qformer_config: QFormerConfig = field(default_factory=QFormerConfig)
    vision_config: VisionConfig = field(default_factory=lambda: VisionConfig(
        image_size=224, patch_size=14, hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_heads=16,
        layer_norm_eps=1e-6, hidden_act="gelu"))

    def __post_init__(self) -> None:
        if isinstance(self.qformer_config, dict):
            known = {f.name for f in dataclasses.fields(QFormerConfig)}
            self.qformer_config = QFormerConfig(**{k: v for k, v in self.qformer_config.items() if k in known})
        super().__post_init__()
        if self.expert_routing != ExpertRouting.IMAGE_CHUNK.value or self.position_ids != PositionIds.SEQUENTIAL.value:
            raise ConfigError("blip2 has no experts and no boi/eoi: use expert_routing=image_chunk, "
                              "position_ids=sequential")
        if self.num_query_tokens < 1:
            raise ConfigError("num_query_tokens must be at least 1")
        if self.template_version not in TEMPLATE_VERSIONS:
            raise ConfigError(f"template_version {self.template_version!r} is unknown; blip2 knows "
                              f"{list(TEMPLATE_VERSIONS)}")

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_attention_heads

    @classmethod
    def tiny(cls, **overrides: Any) -> "Blip2Config":
        base = dict(
            vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, image_token_index=319, num_query_tokens=16,
            qformer_config=QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, cross_attention_frequency=1),
            vision_config=VisionConfig(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96,
                                       num_hidden_layers=2, num_heads=4, hidden_act="gelu", layer_norm_eps=1e-6),
        )
        base.update(overrides)
        return cls(**base)


# --------------------------------------------------------------------- the ViT
class Blip2VisionEmbeddings(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, vc.hidden_size))
        self.patch_embedding = nn.Conv2d(vc.in_channels, vc.hidden_size, vc.patch_size, vc.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, vc.num_positions, vc.hidden_size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat((cls, x), dim=1) + self.position_embedding.to(x.dtype)


class Blip2Attention(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        d = vc.hidden_size
        self.num_heads = vc.num_heads
        self.qkv = nn.Linear(d, 3 * d)  # transformers 5: the q / k / v biases fused, as the weights
        self.projection = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.projection(vit_self_attention(x, q, k, v, self.num_heads))


class Blip2EncoderLayer(nn.Module):
    """Pre-norm block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.self_attn = Blip2Attention(vc)
        self.layer_norm1 = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)
        self.mlp = ViTMLP(vc.hidden_size, vc.intermediate_size, vc.hidden_act)
        self.layer_norm2 = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Blip2Encoder(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(Blip2EncoderLayer(vc) for _ in range(vc.num_hidden_layers))


class Blip2VisionModel(nn.Module):
    """``vision_encoder`` part: pixels -> post-normed hidden states of every token, CLS first."""

    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.embeddings = Blip2VisionEmbeddings(vc)
        self.encoder = Blip2Encoder(vc)
        self.post_layernorm = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


# ------------------------------------------------------------------- Q-Former
class QFormerMultiHeadAttention(nn.Module):
    def __init__(self, qc: QFormerConfig, context_width: int):
        super().__init__()
        d = qc.hidden_size
        self.num_heads = qc.num_attention_heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(context_width, d)
        self.value = nn.Linear(context_width, d)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        q = self.query(x).reshape(B, S, self.num_heads, -1).transpose(1, 2)
        k, v = (p(context).reshape(B, context.shape[1], self.num_heads, -1).transpose(1, 2)
                for p in (self.key, self.value))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, S, D)


class QFormerResidualNorm(nn.Module):
    """BERT's post-norm output: LN(x + dense(h))."""

    def __init__(self, qc: QFormerConfig, in_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, qc.hidden_size)
        self.LayerNorm = nn.LayerNorm(qc.hidden_size, eps=qc.layer_norm_eps)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + x)


class QFormerAttention(nn.Module):
    def __init__(self, qc: QFormerConfig, context_width: int):
        super().__init__()
        self.attention = QFormerMultiHeadAttention(qc, context_width)
        self.output = QFormerResidualNorm(qc, qc.hidden_size)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.output(self.attention(x, context), x)


class QFormerIntermediate(nn.Module):
    def __init__(self, qc: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(qc.hidden_size, qc.intermediate_size)
        self.act = activation(qc.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class QFormerLayer(nn.Module):
    def __init__(self, qc: QFormerConfig, index: int, vision_width: int):
        super().__init__()
        self.attention = QFormerAttention(qc, qc.hidden_size)
        self.has_cross_attention = index % qc.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = QFormerAttention(qc, vision_width)
        self.intermediate_query = QFormerIntermediate(qc)
        self.output_query = QFormerResidualNorm(qc, qc.intermediate_size)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, x)
        if self.has_cross_attention:
            x = self.crossattention(x, image)
        return self.output_query(self.intermediate_query(x), x)


class QFormerEncoder(nn.Module):
    def __init__(self, qc: QFormerConfig, vision_width: int):
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(qc, i, vision_width) for i in range(qc.num_hidden_layers))


class QFormerModel(nn.Module):
    def __init__(self, qc: QFormerConfig, vision_width: int):
        super().__init__()
        self.layernorm = nn.LayerNorm(qc.hidden_size, eps=qc.layer_norm_eps)
        self.encoder = QFormerEncoder(qc, vision_width)


class Connector(nn.Module):
    """``connector`` part: image features [N, T, Dv] -> [N, num_query_tokens, hidden]."""

    def __init__(self, model: "Blip2"):
        super().__init__()
        self.query_tokens = model.query_tokens
        self.qformer = model.qformer
        self.language_projection = model.language_projection

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.qformer.layernorm(self.query_tokens.to(features.dtype).expand(features.shape[0], -1, -1))
        for layer in self.qformer.encoder.layer:
            x = layer(x, features)
        return self.language_projection(x)


# ------------------------------------------------------------------ the model
@register
class Blip2(LlamaDecoderHooks, VLM):
    arch_name = "blip2"
    hf_architectures = ("Blip2ForConditionalGeneration",)
    config_class = Blip2Config
    gguf_arch = "llama"
    has_experts = False
    # No aliases: no other module layout of Blip2ForConditionalGeneration is known here. transformers
    # 4.x checkpoints differ in the ViT's attention bias (self_attn.q_bias and self_attn.v_bias, no k bias;
    # 5.x: one fused self_attn.qkv.bias), which a rename cannot turn into one tensor: not supported yet.
    checkpoint_ignored = (
        r".*\.rotary_emb\.inv_freq",
        # the Q-Former's text-branch FFN (transformers 4.x checkpoints such as Salesforce/blip2-*; 5.x with
        # use_qformer_text_input): only the queries run here, through intermediate_query / output_query
        r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\.(dense|LayerNorm)\.(weight|bias)",
    )

    def __init__(self, config: Blip2Config):
        super().__init__(config)
        qc, vc = config.qformer_config, config.vision_config
        self.vision_model = Blip2VisionModel(vc)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, qc.hidden_size))
        self.qformer = QFormerModel(qc, vc.hidden_size)
        self.language_projection = nn.Linear(qc.hidden_size, config.hidden_size)
        self.language_model = LlamaForCausalLM(config)

    # --------------------------------------------------------------- config I/O
    @classmethod
    def tiny_config(cls, **overrides: Any) -> Blip2Config:
        return Blip2Config.tiny(**overrides)

    @classmethod
    def config_from_hf(cls, hf: dict[str, Any]) -> Blip2Config:
        tc = dict(hf.get("text_config") or {})
        vc = dict(hf.get("vision_config") or {})
        qc = dict(hf.get("qformer_config") or {})
        if tc.get("model_type", "llama") != "llama":
            raise ConfigError(f"blip2 text_config is {tc.get('model_type')!r}; vlmexport runs BLIP-2 with a LLaMA "
                              "decoder only (OPT / Flan-T5 checkpoints are not supported)")
        rope = tc.get("rope_parameters") or {}
        if rope.get("rope_type", "default") not in ("default", None):
            raise ConfigError(f"blip2 text_config uses rope_type {rope.get('rope_type')!r}; only 'default' is "
                              "supported")
        if vc.get("qkv_bias", True) is False:
            raise ConfigError("blip2 vision_config.qkv_bias=false is not supported; the ViT's qkv has a bias")
        vision = VisionConfig(
            image_size=vc.get("image_size", 224), patch_size=vc.get("patch_size", 14),
            hidden_size=vc.get("hidden_size", 1408), intermediate_size=vc.get("intermediate_size", 6144),
            num_hidden_layers=vc.get("num_hidden_layers", 39), num_heads=vc.get("num_attention_heads", 16),
            layer_norm_eps=vc.get("layer_norm_eps", 1e-6), hidden_act=vc.get("hidden_act", "gelu"),
        )
        qformer = QFormerConfig(
            hidden_size=qc.get("hidden_size", 768), num_hidden_layers=qc.get("num_hidden_layers", 12),
            num_attention_heads=qc.get("num_attention_heads", 12), intermediate_size=qc.get("intermediate_size", 3072),
            hidden_act=qc.get("hidden_act", "gelu"), layer_norm_eps=qc.get("layer_norm_eps", 1e-12),
            cross_attention_frequency=qc.get("cross_attention_frequency", 2),
        )
        hidden = tc.get("hidden_size", 4096)
        heads = tc.get("num_attention_heads", 32)
        head_dim = tc.get("head_dim")
        return Blip2Config(
            vocab_size=tc.get("vocab_size", 32000), hidden_size=hidden,
            intermediate_size=tc.get("intermediate_size", 11008), num_hidden_layers=tc.get("num_hidden_layers", 32),
            num_attention_heads=heads, num_key_value_heads=tc.get("num_key_value_heads"),
            rms_norm_eps=tc.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", tc.get("rope_theta", 10000.0)),
            max_position_embeddings=tc.get("max_position_embeddings", 2048), hidden_act=tc.get("hidden_act", "silu"),
            tie_word_embeddings=tc.get("tie_word_embeddings", hf.get("tie_word_embeddings", False)),
            bos_token_id=tc.get("bos_token_id") if tc.get("bos_token_id") is not None else 1,
            eos_token_id=tc.get("eos_token_id") if tc.get("eos_token_id") is not None else 2,
            pad_token_id=tc.get("pad_token_id") if tc.get("pad_token_id") is not None else 0,
            vision_config=vision, qformer_config=qformer,
            image_token_index=hf.get("image_token_index", hf.get("image_token_id", 32000)),
            num_query_tokens=hf.get("num_query_tokens", 32),
            template_version=hf.get("template_version", "blip2"),
            head_dim_override=head_dim if head_dim and head_dim != hidden // heads else None,
        )

    @classmethod
    def config_to_hf(cls, c: Blip2Config) -> dict[str, Any]:
        vc, qc = c.vision_config, c.qformer_config
        return {
            "architectures": list(cls.hf_architectures),
            "model_type": "blip-2",
            "image_token_index": c.image_token_index,
            "num_query_tokens": c.num_query_tokens,
            "template_version": c.template_version,
            "tie_word_embeddings": c.tie_word_embeddings,
            "use_decoder_only_language_model": True,
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
                "model_type": "blip_2_vision_model", "hidden_size": vc.hidden_size,
                "intermediate_size": vc.intermediate_size, "num_hidden_layers": vc.num_hidden_layers,
                "num_attention_heads": vc.num_heads, "image_size": vc.image_size, "patch_size": vc.patch_size,
                "layer_norm_eps": vc.layer_norm_eps, "hidden_act": vc.hidden_act, "qkv_bias": True,
            },
            "qformer_config": {
                "model_type": "blip_2_qformer", "hidden_size": qc.hidden_size,
                "num_hidden_layers": qc.num_hidden_layers, "num_attention_heads": qc.num_attention_heads,
                "intermediate_size": qc.intermediate_size, "hidden_act": qc.hidden_act,
                "layer_norm_eps": qc.layer_norm_eps, "cross_attention_frequency": qc.cross_attention_frequency,
                "encoder_hidden_size": vc.hidden_size,
            },
        }

    # -------------------------------------------------------------------- hooks
    def vision_encoder_module(self) -> nn.Module:
        return self.vision_model

    def connector_module(self) -> nn.Module:
        return Connector(self)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.connector_module()(self.vision_model(pixel_values))

    def reset_special_parameters(self) -> None:
        e = self.vision_model.embeddings
        nn.init.normal_(e.class_embedding, std=0.02)
        nn.init.normal_(e.position_embedding, std=0.02)
        nn.init.normal_(self.query_tokens, std=0.02)

    @classmethod
    def default_chat_template(cls, config: Blip2Config | None = None) -> ChatTemplate:
        """BLIP-2's "Question: {q} Answer:" (images before BOS) or MiniGPT-4's "###Human: <Img><ImageHere></Img>
        {q}###Assistant:" (config ``template_version``), as jinja."""
        version = config.template_version if config is not None else "blip2"
        if version not in TEMPLATE_VERSIONS:
            raise ConfigError(f"template_version {version!r} is unknown; blip2 knows {list(TEMPLATE_VERSIONS)}")
        image = TEMPLATE_VERSIONS[version]
        jinja = BLIP2_CHAT_TEMPLATE.replace("@VERSION@", version).replace("@IMAGE@", image)
        return ChatTemplate(jinja=jinja, image_token=image, content_format="list",
                            encode_runs_apart=version == "minigpt4",
                            source=f"vlmexport:blip2 (template_version={version})")

    @classmethod
    def part_specs(cls, c: Blip2Config) -> PartSpecs:
        vc, qc = c.vision_config, c.qformer_config
        L = "language_model.model.layers.{i}."
        V = "vision_model."
        B = V + "encoder.layers.{i}."
        return PartSpecs(
            vision=VisionSpec(
                image_size=vc.image_size, patch_size=vc.patch_size, hidden_size=vc.hidden_size,
                intermediate_size=vc.intermediate_size, num_layers=vc.num_hidden_layers, num_heads=vc.num_heads,
                layer_norm_eps=vc.layer_norm_eps, activation=vc.hidden_act, norm_placement="pre",
                patch_weight=V + "embeddings.patch_embedding.weight", patch_bias=V + "embeddings.patch_embedding.bias",
                cls=V + "embeddings.class_embedding", positions=V + "embeddings.position_embedding",
                pre_norm=None, qkv=B + "self_attn.qkv.weight", o=B + "self_attn.projection.weight",
                fc1=B + "mlp.fc1.weight", fc2=B + "mlp.fc2.weight", norm1=B + "layer_norm1.weight",
                norm2=B + "layer_norm2.weight", feature_layers=(vc.num_hidden_layers,), keep_cls=True,
                post_norm=(V + "post_layernorm.weight", V + "post_layernorm.bias")),
            connector=ConnectorSpec(
                kind="qformer", activation=qc.hidden_act, layer_norm_eps=qc.layer_norm_eps,
                weights=cls._connector_weights(qc),
                settings={"num_query_tokens": c.num_query_tokens, "hidden_size": qc.hidden_size,
                          "num_layers": qc.num_hidden_layers, "num_heads": qc.num_attention_heads,
                          "cross_attention_every": qc.cross_attention_frequency}),
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

    @staticmethod
    def _connector_weights(qc: QFormerConfig) -> dict[str, str]:
        """The qformer kind's roles -> tensor names (each role's bias as ``<role>_bias``)."""
        names = {"queries": "query_tokens", "queries_norm": "qformer.layernorm.weight",
                 "projection": "language_projection.weight"}
        modules = {"self": "attention.", "cross": "crossattention.", "q": "attention.query", "k": "attention.key",
                   "v": "attention.value", "o": "output.dense", "norm": "output.LayerNorm",
                   "ffn_up": "intermediate_query.dense", "ffn_down": "output_query.dense",
                   "ffn_norm": "output_query.LayerNorm"}
        for i in range(qc.num_hidden_layers):
            for role in layer_roles(i, i % qc.cross_attention_frequency == 0):
                path = "".join(modules[p] for p in role.split(".")[1:])  # "self.q" -> attention.attention.query
                names[role] = f"qformer.encoder.layer.{i}.{path}.weight"
        names.update({f"{r}_bias": bias_of(n) for r, n in list(names.items()) if r != "queries"})
        return names

    def parameter_role(self, name: str) -> str:
        if name == "query_tokens" or name.startswith(("qformer.", "language_projection.")):
            return "connector"
        if name.startswith("vision_model."):
            return "vision"
        if name.startswith("language_model.model.embed_tokens"):
            return "embedding"
        return "language"
