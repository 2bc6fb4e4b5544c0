"""Closed choices and canonical names, one place for every layer.

``Part``, ``Format``, ``Precision`` and ``Backend`` are ``str`` enums: a member equals its
value (``Part.TEXT_DECODER == "text_decoder"``), so manifests stay plain JSON and the CLI
lists the choices in ``--help``. Precisions have one spelling per format in the bundle
(``fp32`` for ONNX, ``f32`` for GGUF, as each tool names them); :func:`precision_in`
maps what a user typed to the format's own spelling, and it is the only such table.

Expert names: the visual expert of a decoder layer is spelled once per file format,
here and nowhere else (ONNX node/initializer names: ``layers.N.vision.*``; GGUF tensors:
``blk.N.vis_*``, as gguf-py's ``MODEL_TENSOR.VISEXP_*`` names them and llama.cpp's
``cogvlm`` graph reads them).
"""

from __future__ import annotations

import re
from enum import Enum

from .errors import VlmexportError



class Part(str, Enum):
    """The parts a model is split into (and the torch reference checkpoint)."""

    VISION_ENCODER = "vision_encoder"
    CONNECTOR = "connector"
    TEXT_DECODER = "text_decoder"
    TOKEN_EMBEDDING = "token_embedding"
    MMPROJ = "mmproj"  # GGUF: vision encoder + connector in llama.cpp's projector file
    MODEL = "model"  # the PyTorch reference checkpoint (format torch)

    def __str__(self) -> str:
        return self.value


ONNX_PARTS = (Part.VISION_ENCODER, Part.CONNECTOR, Part.TEXT_DECODER, Part.TOKEN_EMBEDDING)


class Format(str, Enum):
    ONNX = "onnx"
    GGUF = "gguf"
    TORCH = "torch"  # the reference checkpoint copied into a bundle
    TENSORRT = "tensorrt"  # the TensorRT profile: plain-op ONNX that engines are built from on the device

    def __str__(self) -> str:
        return self.value


class Precision(str, Enum):
    """Every precision a bundle artifact can have, in its format's own spelling."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"
    F32 = "f32"
    F16 = "f16"
    BF16 = "bf16"
    Q8_0 = "q8_0"
    Q4_K_M = "q4_k_m"
    Q4_0 = "q4_0"
    REFERENCE = "reference"  # the torch reference checkpoint

    def __str__(self) -> str:
        return self.value


class Device(str, Enum):
    CPU = "cpu"
    CUDA = "cuda"

    def __str__(self) -> str:
        return self.value


class Backend(str, Enum):
    AUTO = "auto"
    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"
    LLAMACPP = "llamacpp"
    TENSORRT = "tensorrt"

    def __str__(self) -> str:
        return self.value


def _mode(cls, value, option: str, default):
    """``value`` as a member of the mode enum ``cls`` (None: ``default``), or one VlmexportError line
    naming ``option`` and its choices."""
    if value is None:
        return default
    try:
        return cls(value)
    except ValueError:
        raise VlmexportError(f"{option}={value!r}: choose one of {', '.join(m.value for m in cls)}") from None


class Spin(str, Enum):
    """When onnxruntime's pool threads busy-wait between operators (runtimes/onnxruntime_backend.py)."""
    OFF = "off"
    DECODE = "decode"  # inside the decoder graphs' runs only (the default)
    ALL = "all"  # inside every part's runs

    def __str__(self) -> str:
        return self.value

    @classmethod
    def of(cls, spin: "bool | str | Spin | None") -> "Spin":
        """A mode from its name or a bool (True: all, False: off; None: decode), or one VlmexportError line."""
        if isinstance(spin, bool):
            return cls.ALL if spin else cls.OFF
        return _mode(cls, spin, "spin", cls.DECODE)


class CpuPrefill(str, Enum):
    """Which graph runs a quantized decoder's prefill on a CPU (runtimes/cpu_prefill.py)."""
    AUTO = "auto"  # the int8-GEMM copy on x86 CPUs without VNNI, the bundle's graph elsewhere
    INT8 = "int8"  # the int8-GEMM copy on any CPU
    OFF = "off"  # the bundle's graph

    def __str__(self) -> str:
        return self.value

    @classmethod
    def of(cls, mode: "str | CpuPrefill | None") -> "CpuPrefill":
        """A mode from its name (None: auto), or one VlmexportError line."""
        return _mode(cls, mode, "cpu_prefill", cls.AUTO)


# What a user may type (either spelling) -> the format's own spelling. The one table.
PRECISION_NAMES: dict[str, dict[str, str]] = {
    Format.ONNX: {"fp32": "fp32", "fp16": "fp16", "f32": "fp32", "f16": "fp16", "int8": "int8", "int4": "int4"},
    Format.GGUF: {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "f32": "f32", "f16": "f16",
                  "q8_0": "q8_0", "q4_k_m": "q4_k_m", "q4_0": "q4_0"},
    Format.TENSORRT: {"fp32": "fp32", "fp16": "fp16", "f32": "fp32", "f16": "fp16", "int8": "int8", "int4": "int4"},
}
ONNX_FLOAT = (Precision.FP32, Precision.FP16)
ONNX_QUANTIZED = (Precision.INT8, Precision.INT4)  # calibrated from fp32, gated against it
# decoder precisions whose routing-free decode graph (quant/decode_graph.py) the onnxruntime backend
# runs for decode steps. Its session holds a second prepacked copy of the language expert's weights:
# +142 MB for bench-s int4 (for +2-6% decode), where fp32 would add ~0.95 GB
DECODE_GRAPH_PRECISIONS = ("int8", "int4")
# the ONNX text decoder's overridable int64 scalar input (an initializer, default 0): its last layer runs
# the attention output and MLP over each row's last valid position only, the one whose logits it returns
# (exporter/onnx_decoder.py); 1 runs them over every position, as calibration needs (quant/calib.py).
# Only 0 and 1 are meaningful: the graph slices its row indices by the flag's value
DECODER_ALL_ROWS = "last_layer_all_rows"
GGUF_FLOAT = (Precision.F32, Precision.F16, Precision.BF16)
GGUF_QUANTIZED = (Precision.Q8_0, Precision.Q4_K_M, Precision.Q4_0)  # llama.cpp's quantizer on the f16 file


def precision_in(fmt: str, precision: str) -> str | None:
    """``precision`` as ``fmt`` spells it, or None where the format has no such precision."""
    return PRECISION_NAMES.get(Format(fmt), {}).get(str(precision))


# ------------------------------------------------------------------ visual-expert names
# Decoder roles of one expert and their GGUF tensor names: (language, visual expert).
GGUF_EXPERT_TENSORS = {
    "qkv": ("attn_qkv", "vis_attn_qkv"),
    "o": ("attn_output", "vis_attn_output"),
    "gate": ("ffn_gate", "vis_gate"),
    "up": ("ffn_up", "vis_up"),
    "down": ("ffn_down", "vis_down"),
}
_GGUF_VIS_TO_LANG = {vis: lang for lang, vis in GGUF_EXPERT_TENSORS.values()}
_GGUF_BLOCK = re.compile(r"blk\.(\d+)\.([a-z_]+)\.weight")


def onnx_is_visual_expert(name: str) -> bool:
    """Whether an ONNX node or weight name belongs to the visual expert
    (``layers.{i}.vision.*``; the language expert's are ``layers.{i}.language.*``)."""
    return ".vision." in name


def gguf_is_visual_expert(name: str) -> bool:
    """Whether a GGUF tensor name (``blk.N.vis_down.weight``) belongs to the visual expert."""
    return gguf_language_twin(name) is not None


def gguf_language_twin(name: str) -> str | None:
    """``blk.N.vis_down.weight`` -> ``blk.N.ffn_down.weight``; None for a non-expert tensor."""
    m = _GGUF_BLOCK.fullmatch(name)
    if not m or m[2] not in _GGUF_VIS_TO_LANG:
        return None
    return f"blk.{m[1]}.{_GGUF_VIS_TO_LANG[m[2]]}.weight"
