"""Validation of the TensorRT-profile parts on onnxruntime (CPU), against PyTorch.

The same order as every other format (``validate_bundle``): the vision encoder and
connector through ``validate.validate_vision_parts`` (names, dynamic axes, shapes, values), the
text decoder through a two-image prefill and three decode steps of the static-cache
session (:class:`~vlmexport.runtimes.tensorrt_profile.StaticCacheSession`) against
``TorchSession``, then greedy generations on test prompts (identical for fp32, >= 98%
for fp16). This is what can be checked without a GPU: the graphs TensorRT will build
engines from compute the model. It does not check TensorRT's own kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..core.names import ONNX_QUANTIZED
from ..runtimes.spec import model_spec

QUANTIZED = tuple(p.value for p in ONNX_QUANTIZED)
# the accuracy-drop gates of the onnx int8/int4 recipes (quant/gates.py), in percentage points
MAX_ACCURACY_DROP = {"int8": 0.5, "int4": 1.5}


def profile_session(src_model: dict, root: Path, parts: dict, threads: int | None = None,
                    vision_providers: Sequence | None = None):
    """A :class:`StaticCacheSession` over the TensorRT-profile files of one precision (onnxruntime)."""
    from ..runtimes.tensorrt_profile import (
        OrtProfileExecutor,
        ProfileFiles,
        StaticCacheSession,
    )

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
                              progress: Callable[[str], None] = lambda s: None, quant_items: int = 20) -> dict:
    """``{"parts": [...], "end_to_end": [...]}`` rows (``format: tensorrt``); raises ValidationError.

    int8/int4 profiles are scored instead (:func:`quantized_scores`, ``quant_items`` test
    questions per category: int8 with its QDQ vision parts, int4 with the fp16 ones) and gated on
    their accuracy drop."""
    from ..models.checkpoint import load_pretrained
    from ..runtimes.pipeline import Pipeline
    from ..runtimes.torch_backend import pipeline_from_model
    from .validate import end_to_end, validate_decoder, validate_vision_parts

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
    for precision in [p for p in by_precision if p in QUANTIZED]:
        parts = by_precision.pop(precision)
        parts = {**by_precision["fp16"], **parts}  # int4 runs the fp16 vision parts; int8 its own QDQ ones
        progress(f"score tensorrt {precision} decoder against PyTorch fp32 ({quant_items} per category)")
        sess = profile_session(src.model_section(), root, parts)
        pipe = Pipeline(sess, tok, src.template, src.preprocess, model_spec(src.model_section()),
                        backend=f"tensorrt-profile-{precision}")
        e2e.append(quantized_scores(src, torch_pipe, pipe, precision, quant_items))
    for precision, parts in by_precision.items():
        progress(f"validate tensorrt vision parts ({precision})")
        rows += [r | {"format": "tensorrt"} for r in validate_vision_parts(src, root, torch_parts, parts, precision)]
        progress(f"validate tensorrt text decoder ({precision})")
        sess = profile_session(src.model_section(), root, parts)
        rows += [r.to_dict() | {"format": "tensorrt"} for r in validate_decoder(src, model, tok, sess, precision)]
        progress(f"validate end to end (tensorrt {precision} on onnxruntime, {e2e_prompts} prompts)")
        sess.reset()
        pipe = Pipeline(sess, tok, src.template, src.preprocess, model_spec(src.model_section()),
                        backend=f"tensorrt-profile-{precision}")
        e2e.append(end_to_end(src, torch_pipe, pipe, e2e_prompts, precision) | {"format": "tensorrt",
                                                                                 "executed_on": "onnxruntime-cpu"})
    return {"parts": rows, "end_to_end": e2e}


def quantized_scores(src, torch_pipe, q_pipe, precision: str, per_category: int) -> dict:
    """An int8/int4 TensorRT-profile decoder against PyTorch fp32 on balanced test questions:
    last-prompt-position top-1 agreement and cosine, greedy answers identical, exact-match
    accuracy of both and its drop; the drop is gated like the onnx recipes."""
    from ..core.prompt import Turn
    from ..data import SyntheticVQA
    from .parity import ValidationError

    items = SyntheticVQA(image_size=src.preprocess.image_size, seed=0).eval_items("test", per_category)
    agree, cos, same, right_ref, right_q = 0, [], 0, 0, 0
    norm = lambda t: t.strip().lower().rstrip(".")
    for it in items:
        layout, px = torch_pipe.prepare([Turn(user=it.question, images=1)], [it.image])
        a = np.asarray(torch_pipe.session.prefill(layout, torch_pipe.session.encode_images(px)), np.float64)
        b = np.asarray(q_pipe.session.prefill(layout, q_pipe.session.encode_images(px)), np.float64)
        agree += int(a.argmax() == b.argmax())
        cos.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
        ra = torch_pipe.generate(it.question, [it.image], max_new_tokens=16)
        rb = q_pipe.generate(it.question, [it.image], max_new_tokens=16)
        same += int(ra == rb)
        right_ref += int(norm(ra) == norm(it.answer))
        right_q += int(norm(rb) == norm(it.answer))
    n = len(items)
    drop = 100.0 * (right_ref - right_q) / n
    limit = MAX_ACCURACY_DROP[precision]
    row = {"precision": precision, "format": "tensorrt", "executed_on": "onnxruntime-cpu", "prompts": n,
           "identical": same, "rate": same / n, "threshold": 0.0, "required": False,
           "top1_agreement": agree / n, "mean_cosine": float(np.mean(cos)), "min_cosine": float(np.min(cos)),
           "accuracy_fp32": 100.0 * right_ref / n, "accuracy": 100.0 * right_q / n, "accuracy_drop_points": drop,
           "max_accuracy_drop": limit, "passed": drop <= limit}
    if not row["passed"]:
        raise ValidationError(f"tensorrt {precision}: accuracy {row['accuracy']:.2f}% against PyTorch fp32 "
                              f"{row['accuracy_fp32']:.2f}% on {n} test questions, a drop of {drop:.2f} points "
                              f"(gate {limit}); keep fp16 or use int8")
    return row
