"""Declarative descriptions of each part's graph, for exporters that build graphs
directly from checkpoint tensors (streaming, without instantiating the model).

An architecture returns a :class:`PartSpecs` from its ``part_specs(config)`` hook: the
checkpoint tensor names of every weight and the few structural choices (norm placement,
fused or separate QKV, activation, experts). The ONNX and GGUF writers are generic over
these specs, so no exporter ever names an architecture.

Names are templates with ``{i}`` for the layer index. A projection given as a tuple of
names (q, k, v) is concatenated along the output dimension into one fused weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# tensor-name roles of one decoder layer
DECODER_ROLES = ("qkv", "o", "gate", "up", "down")


@dataclass(frozen=True)
class ExpertNames:
    """Weight names of one expert (language or visual) of a decoder layer."""

    qkv: str | tuple[str, str, str]  # fused [3H, H] weight, or (q, k, v) weights
    o: str
    gate: str
    up: str
    down: str
    # q/k/v biases (Qwen2-style attention), same form as ``qkv``; None: the projections have none
    qkv_bias: str | tuple[str, str, str] | None = None


@dataclass(frozen=True)
class CrossAttentionSpec:
    """Gated cross-attention blocks (image placement ``cross_attend``): before decoder layer
    ``j * interval`` runs block ``j`` (names take ``{i}`` = j):
    ``x + tanh(alpha_attn) * gate * attn(RMSNorm(x) W_q, K_j, V_j) W_o``, then
    ``x + tanh(alpha_ffn) * SwiGLU(RMSNorm(x))``, where ``gate`` is 0 for positions that attend
    to no image. The keys and values come precomputed, once per image, from the connector:
    ``memory_tokens`` rows per image, each ``[K_0 | V_0 | K_1 | V_1 | ...]`` (``hidden_size``
    wide each, ``memory_width`` = 2 * num_blocks * hidden_size). No RoPE, no bias."""

    num_blocks: int
    interval: int
    memory_width: int
    memory_tokens: int  # per image
    q: str
    o: str
    gate: str
    up: str
    down: str
    attn_norm: str
    ffn_norm: str
    alpha_attn: str  # tanh gates: shape [1] or [1, 1, hidden]
    alpha_ffn: str
    placeholder_id: int  # the token an image's position holds (e.g. "<image>"), embedded as text
    placeholder_tokens: int = 1  # positions an image takes in the sequence


@dataclass(frozen=True)
class DecoderSpec:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    embed: str
    final_norm: str
    lm_head: str  # may equal ``embed`` for tied embeddings
    attn_norm: str
    ffn_norm: str
    language: ExpertNames
    vision: ExpertNames | None = None  # visual expert; None: no experts
    # llama.cpp architecture of the text GGUF when it differs from the VLM's ``gguf_arch`` (a decoder
    # flavour chosen by config, e.g. a Qwen2 decoder is llama.cpp's "qwen2")
    gguf_arch: str | None = None
    cross_attention: CrossAttentionSpec | None = None  # None: images are spliced into the sequence

    @property
    def has_experts(self) -> bool:
        return self.vision is not None

    @property
    def image_placement(self) -> str:
        """``splice`` or ``cross_attend`` (core.layout.ImagePlacement)."""
        return "splice" if self.cross_attention is None else "cross_attend"


@dataclass(frozen=True)
class VisionSpec:
    """A ViT: patch conv + CLS + learned positions, then pre- or post-norm blocks."""

    image_size: int
    patch_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layer_norm_eps: float
    activation: str  # "gelu" | "quick_gelu" | ...
    norm_placement: str  # "post" (EVA: x + LN(f(x))) | "pre" (CLIP: x + f(LN(x)))
    patch_weight: str
    patch_bias: str | None
    cls: str  # class embedding, shape [D], [1, D] or [1, 1, D]
    positions: str  # [n_patches + 1, D] (or [1, n_patches + 1, D]: timm, transformers), CLS row first
    pre_norm: tuple[str, str] | None  # (weight, bias) of a LayerNorm before the blocks
    qkv: str | tuple[str, str, str]  # weight name(s); biases: same with "weight" -> "bias"
    o: str
    fc1: str
    fc2: str
    norm1: str  # LayerNorm weight name; bias: "weight" -> "bias"
    norm2: str
    # which hidden states feed the connector: indices into [embeddings, layer1, ..., layerN]
    feature_layers: tuple[int, ...] = ()
    keep_cls: bool = False
    # (weight, bias) of a LayerNorm on the last layer's output (BLIP-2's post_layernorm); it
    # needs the last layer to be the one feature layer
    post_norm: tuple[str, str] | None = None
    # layer scale (CaiT / InternViT): per-channel vectors [D] multiplying the attention and MLP
    # branches before each residual add; None: no layer scale
    ls1: str | None = None
    ls2: str | None = None

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def layers_used(self) -> int:
        return max(self.feature_layers) if self.feature_layers else self.num_layers

    @property
    def output_tokens(self) -> int:
        """Tokens per image of ``image_features``: the patches, plus CLS where it is kept."""
        return self.num_patches + (1 if self.keep_cls else 0)

    @property
    def output_width(self) -> int:
        """Feature width of ``image_features`` (hidden size times the number of selected layers)."""
        return self.hidden_size * max(1, len(self.feature_layers))


@dataclass(frozen=True)
class ConnectorSpec:
    """A connector: its ``kind`` (a file in ``models/connectors``: ``glu``, CogVLM's
    linear -> LN -> GELU -> SwiGLU -> linear, + boi/eoi; ``mlp``, LLaVA's linear -> act ->
    linear) and the tensor name of each weight role the kind reads."""

    kind: str
    weights: dict[str, str] = field(default_factory=dict)  # role -> tensor name
    activation: str = "gelu"
    layer_norm_eps: float = 1e-5
    boi: str | None = None
    eoi: str | None = None
    # the kind's structural numbers that no weight shape gives (layer count, heads, how many
    # learned queries a resampler has, a token-merging kind's scale factor); what each kind
    # reads is in its file
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PartSpecs:
    vision: VisionSpec
    connector: ConnectorSpec
    decoder: DecoderSpec

    @property
    def image_tokens(self) -> int:
        """Positions one image takes in the decoder's sequence (the one place this is computed): the
        connector's embeddings, or the placeholder token(s) of a decoder that cross-attends to them."""
        from .connectors import get_connector

        if self.decoder.cross_attention is not None:
            return self.decoder.cross_attention.placeholder_tokens

        return get_connector(self.connector.kind).output_tokens(self.connector, self.vision.output_tokens)

    @property
    def image_embeddings_shape(self) -> tuple[int, int]:
        """(rows, width) of one image's connector output: its spliced embeddings, or the memory a
        cross-attending decoder reads."""
        from .connectors import get_connector

        kind = get_connector(self.connector.kind)
        return (kind.output_tokens(self.connector, self.vision.output_tokens),
                kind.output_width(self.connector, self.decoder.hidden_size))


def bias_of(weight_name: str) -> str:
    if not weight_name.endswith(".weight"):
        raise ValueError(f"{weight_name} is not a weight name")
    return weight_name[: -len("weight")] + "bias"
