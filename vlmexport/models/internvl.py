"""``internvl``: InternViT (pre-norm, layer scale) -> pixel shuffle + MLP projector -> LLaMA or Qwen2.

Module names are those transformers' ``InternVLForConditionalGeneration`` writes with
``save_pretrained`` (transformers 5.25: ``vision_tower.*``, ``multi_modal_projector.*``,
``language_model.model.*``, ``language_model.lm_head``); the module layout of transformers
4.52+ (``model.*``, ``lm_head``) is an alias. The decoder is LLaMA (``text_model_type="llama"``)
or Qwen2 (``"qwen2"``: the same blocks with q/k/v biases), as InternVL's ``text_config`` says.

What this file does not support is refused with one line: InternViT-6B's RMSNorm ViT
(``norm_type="rms_norm"``), qk-norm, mean-pooling off (a final LayerNorm), ``full`` feature
selection (a CLS token cannot be pixel-shuffled), and several feature layers.
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
from .layers import ViTMLP, activation, vit_self_attention
from .llava import LlamaDecoderHooks, LlamaForCausalLM
from .spec import ConnectorSpec, DecoderSpec, ExpertNames, PartSpecs, VisionSpec

TEXT_MODEL_TYPES = ("llama", "qwen2")

# ChatML as InternVL's -hf checkpoints render it (OpenGVLab/InternVL3-1B-hf chat_template), with the
# processor's image expansion written by the template: "<img>" + <IMG_CONTEXT> x image tokens + "</img>"
# (InternVLProcessor wraps every image token, an image item's or one placed in the text; the image
# chunk fills the <IMG_CONTEXT> run, <img>/</img> are text). Turns end
# with the tokenizer's eos_token, which is "<|im_end|>" for InternVL3's Qwen2 tokenizer (the same text)
# and "</s>" for a SentencePiece one, so that generation stops on it. A checkpoint's own
# chat_template (chat_template.json) is used instead where it ships one.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% endif %}{{ eos_token }}{% endgeneration %}{{ '\\n' }}{% else %}"
    "{% if message['content'] is string %}{{ message['content'] | replace('<IMG_CONTEXT>', '<img><IMG_CONTEXT></img>') }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<img><IMG_CONTEXT></img>\\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] | replace('<IMG_CONTEXT>', '<img><IMG_CONTEXT></img>') }}{% endif %}{% endfor %}{% endif %}"
    "{{ eos_token + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass
class InternVLConfig(VLMConfig):
    image_token_index: int = 151667
    projector_hidden_act: str = "gelu"
    downsample_ratio: float = 0.5
    vision_feature_layer: int = -1
    vision_feature_select_strategy: str = "default"
    text_model_type: str = "qwen2"  # "llama" | "qwen2" (q/k/v biases)
    head_dim_override: int | None = None
    vision_attention_bias: bool = True  # InternViT-300M's qkv_bias
    layer_scale_init_value: float = 0.1
    vision_config: VisionConfig = field(default_factory=lambda: VisionConfig(
        image_size=448, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
        num_heads=16, layer_norm_eps=1e-6, hidden_act="gelu"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.expert_routing != ExpertRouting.IMAGE_CHUNK.value or self.position_ids != PositionIds.SEQUENTIAL.value:
            raise ConfigError("internvl has no experts and no boi/eoi: use expert_routing=image_chunk, "
                              "position_ids=sequential")
        if self.text_model_type not in TEXT_MODEL_TYPES:
            raise ConfigError(f"internvl text_model_type {self.text_model_type!r} is not supported; use one of "
                              f"{list(TEXT_MODEL_TYPES)}")
        if self.vision_feature_select_strategy != "default":
            raise ConfigError("internvl pixel-shuffles the patch grid, so the CLS token must be dropped: use "
                              "vision_feature_select_strategy='default'")
        if not isinstance(self.vision_feature_layer, int):
            raise ConfigError("internvl reads one vision_feature_layer (an int); several layers are not supported")
        r = 1.0 / self.downsample_ratio if self.downsample_ratio > 0 else 0
        grid = self.vision_config.image_size // self.vision_config.patch_size
        if r < 1 or abs(r - round(r)) > 1e-6 or grid % round(r):
            raise ConfigError(f"downsample_ratio {self.downsample_ratio} must be 1/r with r an integer dividing the "
                              f"{grid}x{grid} patch grid")

    @property
    def scale_factor(self) -> int:
        return round(1.0 / self.downsample_ratio)

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_attention_heads

    @property
    def attention_bias(self) -> bool:
        return self.text_model_type == "qwen2"

    @classmethod
    def tiny(cls, **overrides: Any) -> "InternVLConfig":
        base = dict(
            vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, image_token_index=319, rms_norm_eps=1e-6,
            text_model_type="qwen2",
            vision_config=VisionConfig(image_size=32, patch_size=4, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_heads=4, hidden_act="gelu", layer_norm_eps=1e-6),
        )
        base.update(overrides)
        return cls(**base)


# --------------------------------------------------------------------- InternViT
class InternVisionPatchEmbeddings(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.projection = nn.Conv2d(vc.in_channels, vc.hidden_size, vc.patch_size, vc.patch_size)


class InternVisionEmbeddings(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, vc.hidden_size))
        self.patch_embeddings = InternVisionPatchEmbeddings(vc)
        self.position_embeddings = nn.Parameter(torch.zeros(1, vc.num_positions, vc.hidden_size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embeddings.projection(pixel_values).flatten(2).transpose(1, 2)
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat((cls, x), dim=1) + self.position_embeddings.to(x.dtype)


class InternVisionAttention(nn.Module):
    def __init__(self, vc: VisionConfig, bias: bool):
        super().__init__()
        d = vc.hidden_size
        self.num_heads = vc.num_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d, bias=bias), nn.Linear(d, d, bias=bias), \
            nn.Linear(d, d, bias=bias)
        self.projection_layer = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = vit_self_attention(x, self.q_proj(x), self.k_proj(x), self.v_proj(x), self.num_heads)
        return self.projection_layer(out)


class InternVisionLayer(nn.Module):
    """Pre-norm block with layer scale: x + l1 * attn(LN(x)), then x + l2 * mlp(LN(x))."""

    def __init__(self, vc: VisionConfig, config: InternVLConfig):
        super().__init__()
        self.attention = InternVisionAttention(vc, config.vision_attention_bias)
        self.mlp = ViTMLP(vc.hidden_size, vc.intermediate_size, vc.hidden_act)
        self.layernorm_before = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)
        self.lambda_1 = nn.Parameter(torch.full((vc.hidden_size,), config.layer_scale_init_value))
        self.lambda_2 = nn.Parameter(torch.full((vc.hidden_size,), config.layer_scale_init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.lambda_1 * self.attention(self.layernorm_before(x))
        return x + self.lambda_2 * self.mlp(self.layernorm_after(x))


class InternVisionEncoder(nn.Module):
    def __init__(self, vc: VisionConfig, config: InternVLConfig):
        super().__init__()
        self.layer = nn.ModuleList(InternVisionLayer(vc, config) for _ in range(vc.num_hidden_layers))


class InternVisionModel(nn.Module):
    def __init__(self, config: InternVLConfig):
        super().__init__()
        self.embeddings = InternVisionEmbeddings(config.vision_config)
        self.encoder = InternVisionEncoder(config.vision_config, config)


class VisionEncoder(nn.Module):
    """``vision_encoder`` part: pixels -> the selected hidden state, CLS dropped."""

    def __init__(self, tower: InternVisionModel, config: InternVLConfig):
        super().__init__()
        self.tower = tower
        n = config.vision_config.num_hidden_layers
        # hidden_states[0] is the embedding output; hidden_states[i] the output of layer i
        self.feature_layer = config.vision_feature_layer % (n + 1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.tower.embeddings(pixel_values)
        for layer in self.tower.encoder.layer[: self.feature_layer]:
            x = layer(x)
        return x[:, 1:]


def pixel_shuffle(x: torch.Tensor, r: int) -> torch.Tensor:
    """[B, n*n, C] -> [B, (n/r)^2, r*r*C]: transformers' ``InternVLModel.pixel_shuffle`` (scale 1/r)."""
    B, T, C = x.shape
    n = int(round(T ** 0.5))
    x = x.reshape(B, n, n // r, C * r).permute(0, 2, 1, 3)
    x = x.reshape(B, n // r, n // r, C * r * r).permute(0, 2, 1, 3)
    return x.reshape(B, -1, C * r * r)


class MultiModalProjector(nn.Module):
    """``connector`` part: pixel shuffle -> LayerNorm -> linear_1 -> act -> linear_2."""

    def __init__(self, config: InternVLConfig):
        super().__init__()
        self.scale_factor = config.scale_factor
        d_in = config.vision_config.hidden_size * self.scale_factor ** 2
        self.layer_norm = nn.LayerNorm(d_in)  # torch's default eps (1e-5), as transformers builds it
        self.linear_1 = nn.Linear(d_in, config.hidden_size)
        self.act = activation(config.projector_hidden_act)
        self.linear_2 = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm(pixel_shuffle(x, self.scale_factor))
        return self.linear_2(self.act(self.linear_1(x)))


# ------------------------------------------------------------------ the model
@register
class InternVL(LlamaDecoderHooks, VLM):
    arch_name = "internvl"
    hf_architectures = ("InternVLForConditionalGeneration",)
    config_class = InternVLConfig
    gguf_arch = "llama"  # the llama flavour; a Qwen2 decoder names "qwen2" in its DecoderSpec
    has_experts = False
    checkpoint_aliases = (
        (r"model\.vision_tower\.(.*)", r"vision_tower.\1"),  # transformers 4.52+ module layout
        (r"model\.multi_modal_projector\.(.*)", r"multi_modal_projector.\1"),  # transformers 4.52+ module layout
        (r"model\.language_model\.(.*)", r"language_model.model.\1"),  # transformers 4.52+ module layout
        (r"lm_head\.weight", r"language_model.lm_head.weight"),  # transformers 4.52+ module layout
    )
    checkpoint_ignored = (r".*\.rotary_emb\.inv_freq",)

    def __init__(self, config: InternVLConfig):
        super().__init__(config)
        self.vision_tower = InternVisionModel(config)
        self.multi_modal_projector = MultiModalProjector(config)
        self.language_model = LlamaForCausalLM(config)  # llava's; Qwen2 = LLaMA + q/k/v biases (attention_bias)

    # --------------------------------------------------------------- config I/O
    @classmethod
    def tiny_config(cls, **overrides: Any) -> InternVLConfig:
        return InternVLConfig.tiny(**overrides)

    @classmethod
    def config_from_hf(cls, hf: dict[str, Any]) -> InternVLConfig:
        tc = dict(hf.get("text_config") or {})
        vc = dict(hf.get("vision_config") or {})
        text_type = tc.get("model_type", "qwen2")
        if text_type not in TEXT_MODEL_TYPES:
            raise ConfigError(f"internvl text_config model_type {text_type!r} is not supported; vlmexport reads "
                              f"{list(TEXT_MODEL_TYPES)} decoders")
        if text_type == "llama" and (tc.get("attention_bias") or tc.get("mlp_bias")):
            raise ConfigError("internvl's llama text_config with attention_bias / mlp_bias is not supported")
        if text_type == "qwen2" and tc.get("use_sliding_window"):
            raise ConfigError("internvl's qwen2 text_config uses a sliding window; only full attention is supported")
        rope = tc.get("rope_parameters") or tc.get("rope_scaling") or {}
        if rope.get("rope_type", "default") not in ("default", None):
            raise ConfigError(f"internvl text_config uses rope_type {rope.get('rope_type')!r}; only 'default' is "
                              "supported")
        if vc.get("norm_type", "layer_norm") != "layer_norm":
            raise ConfigError(f"internvl vision norm_type {vc.get('norm_type')!r} (InternViT-6B) is not supported; "
                              "only 'layer_norm' (InternViT-300M) is")
        if vc.get("use_qk_norm"):
            raise ConfigError("internvl vision use_qk_norm (InternViT-6B) is not supported")
        if not vc.get("use_mean_pooling", True):
            raise ConfigError("internvl vision use_mean_pooling=false (a final LayerNorm) is not supported")
        if not vc.get("use_absolute_position_embeddings", True):
            raise ConfigError("internvl vision without absolute position embeddings is not supported")
        first = lambda v, d: (v[0] if isinstance(v, (list, tuple)) else v) if v is not None else d  # noqa: E731
        image_size, patch_size = first(vc.get("image_size"), 448), first(vc.get("patch_size"), 14)
        for key in ("image_size", "patch_size"):
            val = vc.get(key)
            if isinstance(val, (list, tuple)) and len(set(val)) > 1:
                raise ConfigError(f"internvl vision {key} {val} is not square; only square images are supported")
        vision = VisionConfig(
            image_size=image_size, patch_size=patch_size,
            hidden_size=vc.get("hidden_size", 1024), intermediate_size=vc.get("intermediate_size", 4096),
            num_hidden_layers=vc.get("num_hidden_layers", 24), num_heads=vc.get("num_attention_heads", 16),
            layer_norm_eps=vc.get("layer_norm_eps", 1e-6), hidden_act=vc.get("hidden_act", "gelu"),
            in_channels=vc.get("num_channels", 3),
        )
        hidden = tc.get("hidden_size", 896)
        heads = tc.get("num_attention_heads", 14)
        head_dim = tc.get("head_dim")
        pick = lambda k, d: tc.get(k) if tc.get(k) is not None else d  # noqa: E731
        return InternVLConfig(
            vocab_size=tc.get("vocab_size", 151674), hidden_size=hidden,
            intermediate_size=tc.get("intermediate_size", 4864), num_hidden_layers=tc.get("num_hidden_layers", 24),
            num_attention_heads=heads, num_key_value_heads=tc.get("num_key_value_heads"),
            rms_norm_eps=tc.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", tc.get("rope_theta", 10000.0)),
            max_position_embeddings=tc.get("max_position_embeddings", 32768),
            hidden_act=tc.get("hidden_act", "silu"),
            # the composite config's flag decides (transformers 5 ties on it; the default is True)
            tie_word_embeddings=hf.get("tie_word_embeddings", tc.get("tie_word_embeddings", True)),
            bos_token_id=pick("bos_token_id", 1), eos_token_id=pick("eos_token_id", 2),
            pad_token_id=pick("pad_token_id", 0),
            vision_config=vision,
            image_token_index=hf.get("image_token_id", hf.get("image_token_index", 151667)),
            projector_hidden_act=hf.get("projector_hidden_act", "gelu"),
            downsample_ratio=hf.get("downsample_ratio", 0.5),
            vision_feature_layer=hf.get("vision_feature_layer", -1),
            vision_feature_select_strategy=hf.get("vision_feature_select_strategy", "default"),
            text_model_type=text_type,
            head_dim_override=head_dim if head_dim and head_dim != hidden // heads else None,
            vision_attention_bias=vc.get("attention_bias", False),
            layer_scale_init_value=vc.get("layer_scale_init_value", 0.1),
        )

    @classmethod
    def config_to_hf(cls, c: InternVLConfig) -> dict[str, Any]:
        vc = c.vision_config
        text = {
            "model_type": c.text_model_type, "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
            "rope_parameters": {"rope_theta": c.rope_theta, "rope_type": "default"},
            "max_position_embeddings": c.max_position_embeddings, "hidden_act": c.hidden_act,
            "tie_word_embeddings": c.tie_word_embeddings, "bos_token_id": c.bos_token_id,
            "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
        }
        if c.text_model_type == "llama":
            text.update(attention_bias=False, mlp_bias=False)
        else:
            text.update(use_sliding_window=False, sliding_window=None)
        return {
            "architectures": list(cls.hf_architectures),
            "model_type": "internvl",
            "image_token_id": c.image_token_index,
            "image_seq_length": (vc.image_size // vc.patch_size // c.scale_factor) ** 2,
            "downsample_ratio": c.downsample_ratio,
            "projector_hidden_act": c.projector_hidden_act,
            "vision_feature_layer": c.vision_feature_layer,
            "vision_feature_select_strategy": c.vision_feature_select_strategy,
            "tie_word_embeddings": c.tie_word_embeddings,
            "text_config": text,
            "vision_config": {
                "model_type": "internvl_vision", "hidden_size": vc.hidden_size,
                "intermediate_size": vc.intermediate_size, "num_hidden_layers": vc.num_hidden_layers,
                "num_attention_heads": vc.num_heads, "image_size": [vc.image_size, vc.image_size],
                "patch_size": [vc.patch_size, vc.patch_size], "layer_norm_eps": vc.layer_norm_eps,
                "hidden_act": vc.hidden_act, "num_channels": vc.in_channels,
                "attention_bias": c.vision_attention_bias, "norm_type": "layer_norm", "use_qk_norm": False,
                "use_mean_pooling": True, "use_absolute_position_embeddings": True,
                "layer_scale_init_value": c.layer_scale_init_value,
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
        emb = self.vision_tower.embeddings
        nn.init.normal_(emb.cls_token, std=0.02)
        nn.init.normal_(emb.position_embeddings, std=0.02)
        for layer in self.vision_tower.encoder.layer:
            nn.init.constant_(layer.lambda_1, self.config.layer_scale_init_value)
            nn.init.constant_(layer.lambda_2, self.config.layer_scale_init_value)

    @classmethod
    def default_chat_template(cls, config: InternVLConfig | None = None) -> ChatTemplate:
        """ChatML with InternVL's <img><IMG_CONTEXT>...</img> image expansion (OpenGVLab/InternVL3-1B-hf)."""
        return ChatTemplate(jinja=INTERNVL_CHAT_TEMPLATE, image_token="<IMG_CONTEXT>",
                            source="vlmexport:internvl (OpenGVLab/InternVL3-1B-hf)")

    @classmethod
    def part_specs(cls, c: InternVLConfig) -> PartSpecs:
        vc = c.vision_config
        L = "language_model.model.layers.{i}."
        V = "vision_tower."
        B = V + "encoder.layer.{i}."
        n = vc.num_hidden_layers
        P = "multi_modal_projector."
        attn = (L + "self_attn.q_proj.", L + "self_attn.k_proj.", L + "self_attn.v_proj.")
        return PartSpecs(
            vision=VisionSpec(
                image_size=vc.image_size, patch_size=vc.patch_size, hidden_size=vc.hidden_size,
                intermediate_size=vc.intermediate_size, num_layers=n, num_heads=vc.num_heads,
                layer_norm_eps=vc.layer_norm_eps, activation=vc.hidden_act, norm_placement="pre",
                patch_weight=V + "embeddings.patch_embeddings.projection.weight",
                patch_bias=V + "embeddings.patch_embeddings.projection.bias",
                cls=V + "embeddings.cls_token", positions=V + "embeddings.position_embeddings", pre_norm=None,
                qkv=(B + "attention.q_proj.weight", B + "attention.k_proj.weight", B + "attention.v_proj.weight"),
                o=B + "attention.projection_layer.weight", fc1=B + "mlp.fc1.weight", fc2=B + "mlp.fc2.weight",
                norm1=B + "layernorm_before.weight", norm2=B + "layernorm_after.weight",
                feature_layers=(c.vision_feature_layer % (n + 1),), keep_cls=False,
                ls1=B + "lambda_1", ls2=B + "lambda_2"),
            connector=ConnectorSpec(
                kind="pixel_shuffle", activation=c.projector_hidden_act, layer_norm_eps=1e-5,
                weights={"norm": P + "layer_norm.weight", "norm_bias": P + "layer_norm.bias",
                         "linear_1": P + "linear_1.weight", "linear_1_bias": P + "linear_1.bias",
                         "linear_2": P + "linear_2.weight", "linear_2_bias": P + "linear_2.bias"},
                settings={"scale_factor": c.scale_factor, "grid": vc.image_size // vc.patch_size}),
            decoder=DecoderSpec(
                num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
                vocab_size=c.vocab_size, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
                max_position_embeddings=c.max_position_embeddings,
                embed="language_model.model.embed_tokens.weight", final_norm="language_model.model.norm.weight",
                lm_head=("language_model.model.embed_tokens.weight" if c.tie_word_embeddings
                         else "language_model.lm_head.weight"),
                attn_norm=L + "input_layernorm.weight", ffn_norm=L + "post_attention_layernorm.weight",
                language=ExpertNames(qkv=tuple(a + "weight" for a in attn), o=L + "self_attn.o_proj.weight",
                                     gate=L + "mlp.gate_proj.weight", up=L + "mlp.up_proj.weight",
                                     down=L + "mlp.down_proj.weight",
                                     qkv_bias=tuple(a + "bias" for a in attn) if c.attention_bias else None),
                gguf_arch="qwen2" if c.text_model_type == "qwen2" else None),
        )

    def parameter_role(self, name: str) -> str:
        if name.startswith("multi_modal_projector."):
            return "connector"
        if name.startswith("vision_tower."):
            return "vision"
        if name.startswith("language_model.model.embed_tokens"):
            return "embedding"
        return "language"
