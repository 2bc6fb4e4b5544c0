"""``mlp``: LLaVA's projector. linear_1 -> act -> linear_2 (biases where the spec names them)."""

from __future__ import annotations

from .base import ConnectorKind, GGUFProjector, GGUFTensor, register_connector


@register_connector
class MLP(ConnectorKind):
    name = "mlp"
    # "mlp" is llama.cpp's PROJECTOR_TYPE_MLP name (tools/mtmd/clip-impl.h); gguf-py has no constant.
    # tools/mtmd/models/llava.cpp concatenates CLS after the patches and then keeps embedding rows
    # 1..n ("patches" input in clip.cpp), i.e. it drops the first patch and keeps CLS; measured
    # with llama-cpp-python 0.3.36 (tests/runtimes/test_llamacpp_backend.py asserts it, so a fix
    # upstream shows).
    gguf = GGUFProjector("mlp", "pre", cls_last=True, activations=("gelu",), default_feature_layer=-1, known_issue=(
        "gguf: llama.cpp's mlp (llava) projector returns patches 2..n followed by the CLS token instead of "
        "patches 1..n (tools/mtmd/models/llava.cpp), so GGUF image embeddings differ from the reference"))

    @staticmethod
    def patch_tokens(spec, vision_tokens: int) -> int:
        return vision_tokens

    @staticmethod
    def onnx(ops, spec, features: str, vision_width: int, hidden_size: int) -> str:
        x = ops.activation(ops.linear(features, "linear_1", (hidden_size, vision_width)), spec.activation)
        return ops.linear(x, "linear_2", (hidden_size, hidden_size))

    @staticmethod
    def gguf_tensors(spec) -> list[GGUFTensor]:
        # llama.cpp's llava projector names its two linears mm.0 and mm.2
        out = []
        for bid, role in ((0, "linear_1"), (2, "linear_2")):
            out.append(GGUFTensor("V_MMPROJ", role, bid))
            if role + "_bias" in spec.weights:
                out.append(GGUFTensor("V_MMPROJ", role + "_bias", bid, suffix=".bias"))
        return out
