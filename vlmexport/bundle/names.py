"""Names of the bundle format: schema version, reserved files, manifest sections and the
one table of artifact file names. Pure python, imported by every layer that names a bundle file."""

from __future__ import annotations

from ..core.names import Part

SCHEMA_VERSION = 1
KIND = "vlmexport-bundle"
MANIFEST = "manifest.json"
README = "README.md"
RESERVED = (MANIFEST, README)  # written by BundleWriter itself

# Manifest sections a writer may set, in the order they appear in manifest.json.
SECTIONS = (
    "model",  # model config: arch, semantics (expert_routing, position_ids), sizes, params
    "tokenizer",  # file, kind, vocab size, special ids
    "preprocessing",  # image size, mean/std, resampling (also in preprocessor_config.json)
    "chat_template",  # settings; the jinja itself is chat_template.jinja
    "semantics_deviations",  # list of warnings: an artifact that cannot reproduce the semantics
    "calibration",
    "validation",  # rows {part, precision, check, max_abs_diff, tolerance, passed}, end_to_end
    "benchmarks",
    "tool_versions",  # recorded automatically; set_section merges over it
)


def artifact_file(part: str, fmt: str, precision: str) -> str:
    """The one table of artifact file names inside a bundle (relative paths)."""
    if fmt == "onnx":
        ext = "safetensors" if part == Part.TOKEN_EMBEDDING else "onnx"
        return f"onnx/{part}.{precision}.{ext}"
    if fmt == "tensorrt":  # the TensorRT profile: plain-op ONNX the engines are built from on the device
        ext = "safetensors" if part == Part.TOKEN_EMBEDDING else "onnx"
        return f"tensorrt/{part}.{precision}.{ext}"
    if fmt == "torch":
        return "torch"  # a model directory in the Hugging Face layout
    if fmt == "gguf":  # llama.cpp: the text model and the vision projector (ViT + connector)
        return f"gguf/mmproj-model.{precision}.gguf" if part == Part.MMPROJ else f"gguf/model.{precision}.gguf"
    raise ValueError(f"no file name rule for format {fmt!r}")


# A quantized ONNX precision runs each part in the first of these the bundle holds: int4
# quantizes only the text decoder, so its vision parts run int8 where an int8 build wrote
# them (the int8-vision + int4-decoder combination), else fp32. The build's accuracy gates
# score exactly this combination; the runtime and `bench` load it.
PART_PRECISION_FALLBACK = {"int4": ("int4", "int8", "fp32"), "int8": ("int8", "fp32")}


def part_precision(available, precision: str) -> str | None:
    """The precision a part with ``available`` ONNX precisions runs in when ``precision`` is asked for."""
    for p in PART_PRECISION_FALLBACK.get(precision, (precision,)):
        if p in available:
            return p
    return None
