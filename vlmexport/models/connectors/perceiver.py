"""``perceiver``: Flamingo's perceiver resampler, then the keys and values every gated
cross-attention block of the decoder reads.

``n_latents`` learned latents attend, in ``depth`` blocks, to [ViT features; latents]
(LayerNorms on both, no biases), then a ReLU MLP (4x width), each with a residual; a final
LayerNorm gives ``n_latents`` rows of the ViT's width per image. Each decoder block ``j``
projects those rows to its keys and values once per image; the connector emits them side
by side, ``[K_0 | V_0 | K_1 | V_1 | ...]`` (each ``hidden`` wide), so the decoder's
cross-attention reads precomputed keys/values (``DecoderSpec.cross_attention``), not
features it would project again at every step (docs/export.md, "Cross-attention memory").

Spec: ``settings`` = n_latents, depth, n_heads, head_dim, num_blocks, hidden; weights by role:
``latents``, ``norm`` (final LayerNorm), per depth ``d``: ``d.context_norm``,
``d.latents_norm``, ``d.q``, ``d.k``, ``d.v``, ``d.o``, ``d.mlp_norm``, ``d.fc``, ``d.proj``;
per decoder block ``j``: ``kv.j.k``, ``kv.j.v``.
"""

from __future__ import annotations

from .base import ConnectorKind, GGUFTensor, register_connector


@register_connector
class Perceiver(ConnectorKind):
    name = "perceiver"
    gguf_refusal = ("llama.cpp has no gated cross-attention (Flamingo / Idefics) and no perceiver-resampler "
                    "projector for it")

    @staticmethod
    def fixed_tokens(spec) -> int:
        return int(spec.settings["n_latents"])

    @staticmethod
    def patch_tokens(spec, vision_tokens: int) -> int:
        return int(spec.settings["n_latents"])

    @staticmethod
    def output_width(spec, hidden_size: int) -> int:
        return 2 * int(spec.settings["num_blocks"]) * int(spec.settings["hidden"])

    @staticmethod
    def onnx(ops, spec, features: str, vision_width: int, hidden_size: int) -> str:
        e, W, eps = spec.settings, vision_width, spec.layer_norm_eps
        n, heads, hd, H = int(e["n_latents"]), int(e["n_heads"]), int(e["head_dim"]), int(e["hidden"])
        inner = heads * hd
        latents = ops.parameter("latents", (n, W), features)
        for d in range(int(e["depth"])):
            ctx = ops.layer_norm(features, f"{d}.context_norm", W, eps)
            lat = ops.layer_norm(latents, f"{d}.latents_norm", W, eps)
            both = ops.concat([ctx, lat], axis=1)
            q = ops.linear(lat, f"{d}.q", (inner, W))
            k, v = ops.linear(both, f"{d}.k", (inner, W)), ops.linear(both, f"{d}.v", (inner, W))
            latents = ops.add(ops.linear(ops.attention(q, k, v, heads, hd), f"{d}.o", (W, inner)), latents)
            h = ops.activation(ops.linear(ops.layer_norm(latents, f"{d}.mlp_norm", W, eps), f"{d}.fc", (4 * W, W)),
                               "relu")
            latents = ops.add(ops.linear(h, f"{d}.proj", (W, 4 * W)), latents)
        latents = ops.layer_norm(latents, "norm", W, eps)
        kv = []
        for j in range(int(e["num_blocks"])):
            kv += [ops.linear(latents, f"kv.{j}.k", (H, W)), ops.linear(latents, f"kv.{j}.v", (H, W))]
        return ops.concat(kv, axis=-1)

    @staticmethod
    def gguf_tensors(spec) -> list[GGUFTensor]:
        return []  # no llama.cpp projector: refused by check_gguf (gguf_refusal)
