"""Validation of the TensorRT-profile parts on onnxruntime (CPU), against PyTorch.

The same order as every other format (``validate_bundle``): the vision encoder and
connector through ``validate.validate_part`` (names, dynamic axes, shapes, values), the
text decoder through a two-image prefill and three decode steps of the static-cache
session (:class:`~vlmexport.runtimes.tensorrt_profile.StaticCacheSession`) against
``TorchSession``, then greedy generations on test prompts (identical for fp32, >= 98%
for fp16). This is what can be checked without a GPU: the graphs TensorRT will build
engines from compute the model. It does not check TensorRT's own kernels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch


def profile_session(src_model: dict, root: Path, parts: dict, threads: int | None = None,
                    vision_providers: Sequence | None = None):
    """A :class:`StaticCacheSession` over the TensorRT-profile files of one precision (onnxruntime)."""
    from ..runtimes.tensorrt_profile import OrtProfileExecutor, ProfileFiles, StaticCacheSession

    td = parts["text_decoder"]
    decode = (td.extra or {}).get("decode_graph")
    files = ProfileFiles(text_decoder=root / td.file, token_embedding=root / parts["token_embedding"].file,
                         vision_encoder=root / parts["vision_encoder"].file, connector=root / parts["connector"].file,
                         decode=root / decode if decode else None)
    m = src_model
    ex = OrtProfileExecutor(files, m["num_layers"], m["num_kv_heads"], m["head_dim"], m["max_length"],
                            threads=threads, vision_providers=vision_providers)
    return StaticCacheSession(ex, files.token_embedding, m["hidden_size"], m["vocab_size"])


def validate_tensorrt_profile(src, root: Path, exported: Sequence, e2e_prompts: int,
                              progress: Callable[[str], None] = lambda s: None) -> dict:
    """``{"parts": [...], "end_to_end": [...]}`` rows (``format: tensorrt``); raises ValidationError."""
    from ..models.checkpoint import load_pretrained
    from ..runtimes.pipeline import Pipeline
    from ..runtimes.torch_backend import pipeline_from_model
    from .validate import validate_part
    from .validate_bundle import _dynamic_axes, _images, _spec, end_to_end, validate_decoder

    progress("validate tensorrt profile: load the PyTorch reference")
    loaded = load_pretrained(src.path, dtype=torch.float32)
    model, tok = loaded.model, loaded.tokenizer
    torch_parts = model.parts()
    torch_pipe = pipeline_from_model(model, tok, src.preprocess, src.template)
    by_precision: dict[str, dict] = {}
    for e in exported:
        by_precision.setdefault(e.precision, {})[e.part] = e
    rows: list[dict] = []
    e2e: list[dict] = []
    for precision, parts in by_precision.items():
        progress(f"validate tensorrt vision parts ({precision})")
        pixels = _images(src, 2).astype(np.float16 if precision == "fp16" else np.float32)
        with torch.inference_mode():
            feats = torch_parts["vision_encoder"](torch.from_numpy(pixels.astype(np.float32)))

        def vision_ref(inputs, _enc=torch_parts["vision_encoder"]):
            with torch.inference_mode():
                return {"image_features": _enc(torch.from_numpy(inputs["pixel_values"].astype(np.float32))).numpy()}

        def connector_ref(inputs, _con=torch_parts["connector"]):
            with torch.inference_mode():
                return {"image_embeds": _con(torch.from_numpy(inputs["image_features"].astype(np.float32))).numpy()}

        for part, fn, inputs, outputs in (
            ("vision_encoder", vision_ref, {"pixel_values": pixels}, ["image_features"]),
            ("connector", connector_ref, {"image_features": feats.numpy().astype(pixels.dtype)}, ["image_embeds"]),
        ):
            e = parts[part]
            rows += [r.to_dict() | {"format": "tensorrt"}
                     for r in validate_part(root / e.file, fn, inputs, outputs, _dynamic_axes(e), precision, part)]
        progress(f"validate tensorrt text decoder ({precision})")
        sess = profile_session(src.model_section(), root, parts)
        rows += [r.to_dict() | {"format": "tensorrt"} for r in validate_decoder(src, model, tok, sess, precision)]
        progress(f"validate end to end (tensorrt {precision} on onnxruntime, {e2e_prompts} prompts)")
        sess.reset()
        pipe = Pipeline(sess, tok, src.template, src.preprocess, _spec(src), backend=f"tensorrt-profile-{precision}")
        e2e.append(end_to_end(src, torch_pipe, pipe, e2e_prompts, precision) | {"format": "tensorrt",
                                                                                 "executed_on": "onnxruntime-cpu"})
    return {"parts": rows, "end_to_end": e2e}
