"""``mlp``: LLaVA's projector. linear_1 -> act -> linear_2 (biases where the spec names them)."""

from __future__ import annotations

from .base import ConnectorKind, GGUFProjector, GGUFTensor, register_connector


@register_connector
class MLP(ConnectorKind):
    name = "mlp"
    # "mlp" is llama.cpp's PROJECTOR_TYPE_MLP name (tools/mtmd/clip-impl.h); gguf-py has no constant.
    # tools/mtmd/models/llava.cpp concatenates CLS *after* the patches, then adds position rows
    # 0..n in order and keeps sequence rows 1..n ("positions" / "patches" inputs in clip.cpp):
    # with a CLS token, the first patch is dropped and CLS is handed to the LLM as an image token
    # (upstream llama.cpp issue 25814; measured with llama-cpp-python 0.3.36, also on a file written
    # by llama.cpp's own legacy converter). Without a CLS tensor the graph keeps every patch in
    # order, so the mmproj is written without it: what still differs is that the ViT runs without
    # the CLS token, which the build measures (tests/runtimes/test_llamacpp_backend.py, and
    # scripts/llava_mmproj_vs_llamacpp.py against llama.cpp's own legacy converter).
    gguf = GGUFProjector("mlp", "pre", cls_last=False, drop_cls=True, explicit_feature_layers=True,
                         legacy_square_ffn=True, activations=("gelu",), known_issue=(
        "gguf: llama.cpp's llava (mlp) graph cannot place the CLS token (it appends it after the patches and "
        "then drops the first patch); the mmproj is written without CLS, so llama.cpp's ViT runs on the patches "
        "alone"))

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
