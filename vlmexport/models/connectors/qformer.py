"""``qformer``: BLIP-2's Querying Transformer, then a linear projection into the decoder.

Learned queries [Q, Dq] -> LayerNorm -> ``num_layers`` BERT-style post-norm layers, each:
self-attention over the queries (``x = LN(x + o(attn(x, x)))``), cross-attention from the
queries to the image features every ``cross_attention_every`` layers (layer 0 included:
``x = LN(x + o(attn(x, features)))``), then the FFN (``x = LN(x + down(act(up(x))))``);
finally ``projection`` to the decoder width. One image becomes Q embeddings whatever the
number of ViT tokens (CLS included: the queries attend to all of them).

Roles (biases as ``<role>_bias``): ``queries``, ``queries_norm``, ``projection`` and per
layer ``i``: ``layer{i}.self.{q,k,v,o,norm}``, ``layer{i}.cross.{q,k,v,o,norm}`` (cross
layers only), ``layer{i}.ffn_up``, ``layer{i}.ffn_down``, ``layer{i}.ffn_norm``.
Settings: ``num_query_tokens``, ``hidden_size`` (Dq), ``num_layers``, ``num_heads``,
``cross_attention_every``.
"""

from __future__ import annotations

from ...core.errors import ConfigError
from .base import ConnectorKind, register_connector

SETTINGS = ("num_query_tokens", "hidden_size", "num_layers", "num_heads", "cross_attention_every")


def layer_roles(i: int, cross: bool) -> list[str]:
    """The weight roles of Q-Former layer ``i`` (biases not listed)."""
    blocks = ("self", "cross") if cross else ("self",)
    return [f"layer{i}.{b}.{r}" for b in blocks for r in ("q", "k", "v", "o", "norm")] + \
        [f"layer{i}.ffn_up", f"layer{i}.ffn_down", f"layer{i}.ffn_norm"]


def _settings(spec) -> tuple[int, int, int, int, int]:
    missing = [k for k in SETTINGS if k not in spec.settings]
    if missing:
        raise ConfigError(f"connector kind 'qformer' needs the settings {missing} in its part spec")
    q, d, n, h, every = (int(spec.settings[k]) for k in SETTINGS)
    if d % h:
        raise ConfigError(f"Q-Former hidden_size {d} is not divisible by its {h} heads")
    return q, d, n, h, every


def _attention_block(ops, role: str, x: str, context: str, width: int, context_width: int, heads: int,
                     eps: float) -> str:
    q = ops.linear(x, f"{role}.q", (width, width))
    k = ops.linear(context, f"{role}.k", (width, context_width))
    v = ops.linear(context, f"{role}.v", (width, context_width))
    out = ops.linear(ops.attention(q, k, v, heads, width // heads), f"{role}.o", (width, width))
    return ops.layer_norm(ops.add(out, x), f"{role}.norm", width, eps)


@register_connector
class QFormer(ConnectorKind):
    name = "qformer"
    gguf_refusal = ("llama.cpp has no Q-Former projector (libmtmd's 'resampler' is MiniCPM-V's single "
                    "cross-attention layer, not BLIP-2's stack of self- and cross-attention layers)")

    @staticmethod
    def patch_tokens(spec, vision_tokens: int) -> int:
        """The number of learned queries, independent of the ViT's token count."""
        return _settings(spec)[0]

    @staticmethod
    def fixed_tokens(spec) -> int:
        return _settings(spec)[0]  # fixed, even where the input token axis is dynamic

    @staticmethod
    def onnx(ops, spec, features: str, vision_width: int, hidden_size: int) -> str:
        n_query, width, n_layers, heads, every = _settings(spec)
        eps = spec.layer_norm_eps
        x = ops.layer_norm(ops.parameter("queries", (n_query, width), features), "queries_norm", width, eps)
        for i in range(n_layers):
            x = _attention_block(ops, f"layer{i}.self", x, x, width, width, heads, eps)
            if i % every == 0:
                x = _attention_block(ops, f"layer{i}.cross", x, features, width, vision_width, heads, eps)
            h = ops.activation(ops.linear(x, f"layer{i}.ffn_up", (None, width)), spec.activation)
            x = ops.layer_norm(ops.add(ops.linear(h, f"layer{i}.ffn_down", (width, None)), x), f"layer{i}.ffn_norm",
                               width, eps)
        return ops.linear(x, "projection", (hidden_size, width))

    @staticmethod
    def gguf_tensors(spec):
        raise ConfigError(f"GGUF export: {QFormer.gguf_refusal}; build --format onnx instead")
