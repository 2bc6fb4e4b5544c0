"""Validation of a bundle's ONNX exports against the PyTorch reference.

Per part, in the fixed order of ``validate.validate_part`` (output names, dynamic axes,
shapes, values); the text decoder through a prefill + decode run of the onnxruntime
session against ``TorchSession``; then end to end: greedy generations of the exported
model against PyTorch on test-split prompts. A failure raises (the build writes nothing);
the results go into the manifest's ``validation`` section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..core.layout import build_layout
from ..core.names import Part
from ..core.prompt import Turn, render
from ..models.checkpoint import load_pretrained
from ..runtimes.torch_session import TorchSession
from ..runtimes.pipeline import Pipeline
from ..runtimes.spec import decoder_shape, model_spec
from ..runtimes.torch_backend import pipeline_from_model
from .parity import CheckResult, ValidationError, tolerance_for, validate_part

# greedy generations that must be identical to PyTorch, per precision
E2E_THRESHOLDS = {"fp32": 1.0, "fp16": 0.98, "f32": 1.0, "f16": 0.98, "bf16": 0.98}
# llama.cpp against PyTorch, relative to max|reference|: its ViT runs the patch conv in f16
# and GELU through an f16 table, and its CPU attention defaults to flash attention with an
# f16 KV cache; measured on jittered tiny models: embeddings <= 1.9e-3, logits <= 2.3e-3
GGUF_TOLERANCE = {"f32": 5e-3, "f16": 2e-2, "bf16": 5e-2,
                  # llama.cpp-quantized text GGUFs: a guard against broken files, not a parity claim.
                  # Worst prompt-logit error measured on jittered tiny cogvlms (tests/exporter/
                  # test_gguf_quant.py, 3 images): q8_0 0.20, q4_k_m 0.78, q4_0 0.87 of max|ref|; on a
                  # trained 4-layer checkpoint (56 test prompts) 0.011, 0.033, 0.039.
                  "q8_0": 0.3, "q4_k_m": 1.0, "q4_0": 1.0}
# the mmproj paired with a quantized text GGUF (llama.cpp's q8_0): measured 1.6e-2..2.0e-2
GGUF_MMPROJ_TOLERANCE = {"q8_0": 3e-2}
# quantized GGUFs: greedy agreement with PyTorch is reported, not required (one flipped token
# changes the rest of a generation); their task accuracy (`vlmexport eval`) is the measure
for _q in ("q8_0", "q4_k_m", "q4_0"):
    E2E_THRESHOLDS[_q] = 0.0


def _images(src, n: int) -> np.ndarray:
    from ..core.preprocess import to_pixels
    from ..data import SyntheticVQA

    gen = SyntheticVQA(image_size=src.preprocess.image_size, seed=0)
    return np.stack([to_pixels(gen.sample("test", i).image, src.preprocess) for i in range(n)])


def _ort_session(src, root: Path, parts: dict[str, object], precision: str):
    from ..runtimes.onnxruntime_backend import OrtModelSession

    return OrtModelSession(root / parts[Part.TEXT_DECODER].file, root / parts[Part.TOKEN_EMBEDDING].file,
                           decoder_shape(src.model_section()),
                           vision_encoder_path=root / parts[Part.VISION_ENCODER].file,
                           connector_path=root / parts[Part.CONNECTOR].file)


def validate_decoder(src, model, tokenizer, ort_session, precision: str) -> list[CheckResult]:
    """Prefill a two-image prompt and decode a few tokens on both; compare logits."""
    tol = tolerance_for(precision)
    pixels = _images(src, 2)
    pieces = render(src.template, [Turn(user="<image> and <image> Question: what is shown?", images=2)], tokenizer,
                    src.image_tokens).pieces
    layout = build_layout(pieces, src.config.expert_routing, src.config.position_ids,
                          image_pad_id=src.config.pad_token_id)
    ref = TorchSession(model)
    ref_embeds = ref.encode_images(pixels)
    results = []
    ref_logits = [ref.prefill(layout, ref_embeds)]
    ort_logits = [ort_session.prefill(layout, ort_session.encode_images(pixels))]
    pos = layout.next_position
    for tok in (5, 6, 7):
        ref_logits.append(ref.decode(tok, pos))
        ort_logits.append(ort_session.decode(tok, pos))
        pos += 1
    for step, (a, b) in enumerate(zip(ort_logits, ref_logits)):
        if a.shape != b.shape:
            raise ValidationError(f"text_decoder ({precision}): logits shape {a.shape} differs from PyTorch {b.shape}")
        diff = np.abs(a.astype(np.float32) - b)
        limit = tol.bound(b)
        worst = int(diff.argmax())
        ok = bool(diff.max() <= limit)
        results.append(CheckResult(Part.TEXT_DECODER, precision, f"values:{'prefill' if step == 0 else f'decode{step}'}",
                                   float(diff.max()), float(limit), ok))
        if not ok:
            raise ValidationError(
                f"text_decoder ({precision}) {'prefill' if step == 0 else f'decode step {step}'}: logits differ from "
                f"PyTorch by {diff.max():.3g} at token {worst} (onnx {a[worst]:.6g}, torch {b[worst]:.6g}); "
                f"tolerance {limit:.3g}")
    return results


def end_to_end(src, torch_pipe: Pipeline, ort_pipe: Pipeline, n_prompts: int, precision: str) -> dict:
    from ..data import SyntheticVQA

    per_cat = max(2, -(-n_prompts // 7))
    per_cat += per_cat % 2
    items = SyntheticVQA(image_size=src.preprocess.image_size, seed=0).eval_items("test", per_cat)[: max(n_prompts, 1)]
    same, mismatches = 0, []
    for it in items:
        a = torch_pipe.generate(it.question, [it.image], max_new_tokens=16)
        b = ort_pipe.generate(it.question, [it.image], max_new_tokens=16)
        if a == b:
            same += 1
        elif len(mismatches) < 5:
            mismatches.append({"question": it.question, "torch": a, "onnx": b})
    rate = same / len(items)
    threshold = E2E_THRESHOLDS.get(precision, 0.98)
    row = {"precision": precision, "prompts": len(items), "identical": same, "rate": rate, "threshold": threshold,
           "passed": rate >= threshold, "required": threshold > 0, "mismatches": mismatches}
    if not row["passed"]:
        raise ValidationError(f"end to end ({precision}): {same}/{len(items)} greedy generations equal PyTorch "
                              f"({rate:.1%}, needs {threshold:.0%}); first mismatch: {mismatches[:1]}")
    return row


def validate_gguf(src, model, tok, root: Path, parts: dict, precision: str, torch_pipe: Pipeline, e2e_prompts: int,
                  progress: Callable[[str], None]) -> tuple[list[dict], dict]:
    """The llama.cpp pair against PyTorch: image embeddings, prompt logits, then greedy answers."""
    from ..core.errors import MissingDependencyError
    from ..runtimes.llamacpp_backend import LlamaCppSession, llamacpp_available

    if not llamacpp_available():
        raise MissingDependencyError("validating GGUF files needs llama-cpp-python; install `vlmexport[llamacpp]` "
                                     "or build with --no-validate")
    m = src.model_section()
    sess = LlamaCppSession(root / parts[Part.TEXT_DECODER].file, root / parts[Part.MMPROJ].file, n_ctx=m["max_length"],
                           expected_arch=m["gguf_arch"])
    rel = GGUF_TOLERANCE.get(precision, 5e-2)
    mm_type = (getattr(parts[Part.MMPROJ], "extra", None) or {}).get("outtype", precision)
    mm_rel = GGUF_MMPROJ_TOLERANCE.get(mm_type, GGUF_TOLERANCE.get(mm_type, rel))
    pixels = _images(src, 2)
    ref = TorchSession(model)
    rows = []
    ref_emb, got_emb = ref.encode_images(pixels), sess.encode_images(pixels)
    pieces = render(src.template, [Turn(user="<image> and <image> Question: what is shown?", images=2)], tok,
                    src.image_tokens).pieces
    layout = build_layout(pieces, src.config.expert_routing, src.config.position_ids,
                          image_pad_id=src.config.pad_token_id)
    ref_logits = ref.prefill(layout, ref_emb)
    got_logits = sess.prefill(layout, got_emb)
    for part, a, b in ((Part.MMPROJ, got_emb, ref_emb), (Part.TEXT_DECODER, got_logits, ref_logits)):
        if a.shape != b.shape:
            raise ValidationError(f"{part} (gguf {precision}): shape {list(a.shape)} differs from PyTorch "
                                  f"{list(b.shape)}")
        diff = np.abs(a.astype(np.float32) - b)
        bound = (mm_rel if part == Part.MMPROJ else rel) * float(np.abs(b).max())
        row = {"part": part, "precision": precision, "check": "values", "max_abs_diff": float(diff.max()),
               "tolerance": bound, "passed": bool(diff.max() <= bound), "format": "gguf"}
        if part == Part.TEXT_DECODER:  # what a quantized file keeps: the ranking of the logits
            row["correlation"] = float(np.corrcoef(a.reshape(-1), b.reshape(-1))[0, 1])
            row["top1_agrees"] = bool(int(a.argmax()) == int(b.argmax()))
        rows.append(row)
        if not row["passed"]:
            idx = np.unravel_index(int(diff.argmax()), diff.shape)
            raise ValidationError(f"{part} (gguf {precision}): differs from PyTorch by {diff.max():.3g} at "
                                  f"{list(idx)} (llama.cpp {a[idx]:.6g}, torch {b[idx]:.6g}); tolerance {bound:.3g}")
    progress(f"validate end to end (gguf {precision}, {e2e_prompts} prompts)")
    sess.reset()
    spec = model_spec(src.model_section())
    pipe = Pipeline(sess, tok, src.template, src.preprocess, spec, backend=f"llamacpp-{precision}")
    return rows, end_to_end(src, torch_pipe, pipe, e2e_prompts, precision)


def validate_exports(src, root: Path, exported: Sequence, e2e_prompts: int,
                     progress: Callable[[str], None] = lambda s: None) -> dict:
    progress("validate: load the PyTorch reference")
    loaded = load_pretrained(src.path, dtype=torch.float32)
    model, tok = loaded.model, loaded.tokenizer
    torch_parts = model.parts()
    by_precision: dict[str, dict[str, object]] = {}
    gguf: dict[str, dict[str, object]] = {}
    for e in exported:
        (gguf if e.format == "gguf" else by_precision).setdefault(e.precision, {})[e.part] = e
    rows: list[dict] = []
    e2e: list[dict] = []
    torch_pipe = pipeline_from_model(model, tok, src.preprocess, src.template)
    for precision, parts in by_precision.items():
        progress(f"validate vision parts ({precision})")
        pixels = _images(src, 2).astype(np.float16 if precision == "fp16" else np.float32)
        with torch.inference_mode():
            feats = torch_parts[Part.VISION_ENCODER](torch.from_numpy(pixels.astype(np.float32)))

        def vision_ref(inputs, _enc=torch_parts[Part.VISION_ENCODER]):
            with torch.inference_mode():
                return {"image_features": _enc(torch.from_numpy(inputs["pixel_values"].astype(np.float32))).numpy()}

        def connector_ref(inputs, _con=torch_parts[Part.CONNECTOR]):
            with torch.inference_mode():
                return {"image_embeds": _con(torch.from_numpy(inputs["image_features"].astype(np.float32))).numpy()}

        ve, co = parts[Part.VISION_ENCODER], parts[Part.CONNECTOR]
        for part, fn, inputs, outputs, e in (
            (Part.VISION_ENCODER, vision_ref, {"pixel_values": pixels}, ["image_features"], ve),
            (Part.CONNECTOR, connector_ref, {"image_features": feats.numpy().astype(pixels.dtype)}, ["image_embeds"], co),
        ):
            axes = _dynamic_axes(e)
            rows += [r.to_dict() for r in validate_part(root / e.file, fn, inputs, outputs, axes, precision, part)]
        progress(f"validate text decoder ({precision})")
        sess = _ort_session(src, root, parts, precision)
        rows += [r.to_dict() for r in validate_decoder(src, model, tok, sess, precision)]
        progress(f"validate end to end ({precision}, {e2e_prompts} prompts)")
        spec = model_spec(src.model_section())
        ort_pipe = Pipeline(sess, tok, src.template, src.preprocess, spec, backend=f"onnxruntime-{precision}")
        row = end_to_end(src, torch_pipe, ort_pipe, e2e_prompts, precision)
        e2e.append(row | {"format": "onnx"})
    for precision, parts in gguf.items():
        progress(f"validate gguf ({precision})")
        g_rows, g_e2e = validate_gguf(src, model, tok, root, parts, precision, torch_pipe, e2e_prompts, progress)
        rows += g_rows
        e2e.append(g_e2e | {"format": "gguf"})
    return {"parts": rows, "end_to_end": e2e}


def _dynamic_axes(e) -> dict:
    axes: dict[str, dict[int, str]] = {}
    for spec in list(e.inputs) + list(e.outputs):
        dims = {i: d for i, d in enumerate(spec["shape"]) if isinstance(d, str)}
        if dims:
            axes[spec["name"]] = dims
    return axes
