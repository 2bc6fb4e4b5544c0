"""INT8 vision parts of the TensorRT profile: explicit symmetric QDQ, calibrated on image data.

TensorRT 10 builds INT8 from explicit ``QuantizeLinear`` / ``DequantizeLinear`` pairs (its implicit
calibrator is deprecated, and TensorRT 11 drops it), symmetric only: zero points absent or zero.
The ONNX int8 recipe already writes exactly that for the vision encoder and the connector
(:func:`vlmexport.quant.quantize.quantize_int8_static`: per-channel symmetric int8 weights,
symmetric int8 activations, ranges from the calibration images, percentile 99.999 by default),
biases kept float (TensorRT 10.3 parses no INT32 DequantizeLinear; the audit caught it),
so the TensorRT profile runs the same quantizer, with the same calibration set and recipe, on
its own fp32 copies of those graphs (the connector's token count fixed, as in every TensorRT
precision). The float operators around the pairs stay fp32 (a strongly typed network keeps the
graph's types): LayerNormalization, Softmax and GELU are not where a ViT spends its time.

The files are audited like every profile graph (``tensorrt_audit``: the QuantizeLinear rules)
and scored with the int8 decoder against PyTorch (``tensorrt_validate.quantized_scores``: the
int8 gate). Their engines are built on the device like the others; nothing here ran TensorRT.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from ..bundle import artifact_file
from ..exporter.parts import ExportedPart, exported_part

SOURCE_DIR = ".tensorrt-int8-source"  # fp32 copies quantized from, inside the bundle being written; removed


def quantize_tensorrt_vision(src, root: Path, options=None, progress: Callable[[str], None] = lambda s: None
                             ) -> list[ExportedPart]:
    """``tensorrt/vision_encoder.int8.onnx`` and ``tensorrt/connector.int8.onnx`` (module doc)."""
    import onnxruntime as ort

    from ..exporter.onnx_vision import export_connector, export_vision_encoder
    from ..exporter.tensorrt import audit_graphs
    from ..models.checkpoint import read_tokenizer
    from ..quant.calib import feature_reader, pixel_reader
    from ..quant.quantize import quantize_int8_static
    from ..quant.recipe import for_precision
    from .quantize import QuantOptions, calibration_for, recipe_for

    options = options or QuantOptions()
    s = src.specs
    recipe = recipe_for(options, src.arch)
    progress("calibrate: build the calibration set (tensorrt int8 vision parts)")
    calib = calibration_for(read_tokenizer(src.path).path, src.template, src.preprocess, src.model_section(), options)
    tmp = root / SOURCE_DIR
    out: list[ExportedPart] = []
    try:
        t0 = time.perf_counter()
        progress("export the fp32 vision parts to quantize (tensorrt int8)")
        graphs = {
            "vision_encoder": export_vision_encoder(src.tensors, s.vision, tmp / "vision_encoder.fp32.onnx", "fp32"),
            "connector": export_connector(src.tensors, s.connector, s.vision.output_width, s.decoder.hidden_size,
                                          tmp / "connector.fp32.onnx", "fp32", num_tokens=s.vision.output_tokens),
        }
        vision = ort.InferenceSession(str(graphs["vision_encoder"].path), providers=["CPUExecutionProvider"])
        readers = {"vision_encoder": lambda: pixel_reader(calib),
                   "connector": lambda: feature_reader(
                       lambda px: vision.run(["image_features"], {"pixel_values": px})[0], calib)}
        for part, g in graphs.items():
            progress(f"quantize {part} (tensorrt int8)")
            rel = artifact_file(part, "tensorrt", "int8")
            q = quantize_int8_static(part, g.path, root / rel, readers[part](), for_precision(recipe, part, "int8"),
                                     options.calibration_method, quantize_bias=False)
            e = exported_part(part, "int8", rel, g, root, time.perf_counter() - t0)
            data = tuple(str(f.relative_to(root)) for f in q.data_files)
            extra = {"audit": audit_graphs([root / rel], root),
                     "quantization": {"scheme": "int8 static QDQ: symmetric per-channel weights, symmetric "
                                                "activations (explicit quantization)", "float_type": "fp32",
                                      "calibration_method": options.calibration_method,
                                      "calibration_images": options.calibration.images,
                                      "quantized_nodes": len(q.quantized_nodes)}}
            out.append(ExportedPart(part, "tensorrt", "int8", rel, data, e.inputs, e.outputs, e.seconds, extra))
            t0 = time.perf_counter()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
