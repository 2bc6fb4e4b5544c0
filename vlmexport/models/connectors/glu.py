"""``glu``: CogVLM's adapter. linear -> LayerNorm -> act -> ``silu(gate) * up`` -> down,
with learned ``boi`` / ``eoi`` embeddings around the projected patches."""

from __future__ import annotations

from .base import ConnectorKind, GGUFProjector, GGUFTensor, register_connector


@register_connector
class GLU(ConnectorKind):
    name = "glu"
    # tools/mtmd/models/cogvlm.cpp: post-norm EVA blocks, CLS appended after the patches, last layer
    gguf = GGUFProjector("cogvlm", "post", cls_last=True, reads_last_layer_only=True)

    @staticmethod
    def onnx(ops, spec, features: str, vision_width: int, hidden_size: int) -> str:
        x = ops.linear(features, "linear", (hidden_size, vision_width))
        x = ops.activation(ops.layer_norm(x, "norm", hidden_size, spec.layer_norm_eps), spec.activation)
        gate = ops.silu(ops.linear(x, "gate", (None, hidden_size)))
        x = ops.mul(gate, ops.linear(x, "up", (None, hidden_size)))
        return ops.linear(x, "down", (hidden_size, None))

    @staticmethod
    def gguf_tensors(spec) -> list[GGUFTensor]:
        return [GGUFTensor("V_TOK_BOI", "@boi", suffix=""), GGUFTensor("V_TOK_EOI", "@eoi", suffix=""),
                GGUFTensor("V_MM_DOWN", "down"), GGUFTensor("V_MM_UP", "up"), GGUFTensor("V_MM_GATE", "gate"),
                GGUFTensor("V_MMPROJ_FC", "linear"), GGUFTensor("V_MM_POST_FC_NORM", "norm_bias", suffix=".bias"),
                GGUFTensor("V_MM_POST_FC_NORM", "norm")]
