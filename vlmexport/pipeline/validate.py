"""Validation of a bundle's exports against the PyTorch reference.

Per part, in the fixed order of ``validate.validate_part`` (output names, dynamic axes,
shapes, values); the text decoder through a prefill + decode run of the onnxruntime
session against ``TorchSession``; the GGUF pair through llama.cpp; then end to end:
greedy generations of the exported model against PyTorch on test-split prompts, where a
divergence counts only if the reference's top-two margin exceeds the precision's
tolerance (``agreement.py``; near-ties are reported). Each format is validated on its own:
a failing one is reported under ``failed`` and the build drops it, keeping the others. A
GGUF with a known deviation (``exporter.gguf.gguf_deviations``) has what the deviation
touches measured, not checked. The results go into the manifest's ``validation`` section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..core.layout import build_layout
from ..core.prompt import Turn, render
from ..models.checkpoint import load_pretrained
from ..runtimes.pipeline import Pipeline
from ..runtimes.spec import decoder_shape, model_spec
from ..runtimes.torch_backend import pipeline_from_model
from ..runtimes.torch_session import TorchSession
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

    return OrtModelSession(root / parts["text_decoder"].file, root / parts["token_embedding"].file,
                           decoder_shape(src.model_section()),
                           vision_encoder_path=root / parts["vision_encoder"].file,
                           connector_path=root / parts["connector"].file)


def validate_decoder(src, model, tokenizer, ort_session, precision: str) -> list[CheckResult]:
    """Prefill a two-image prompt and decode a few tokens on both; compare logits."""
    tol = tolerance_for(precision)
    pixels = _images(src, 2)
    pieces = render(src.template, [Turn(user="<image> and <image> Question: what is shown?", images=2)], tokenizer,
                    src.image_tokens).pieces
    layout = build_layout(pieces, src.config.expert_routing, src.config.position_ids, **src.layout_options())
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
        results.append(CheckResult("text_decoder", precision, f"values:{'prefill' if step == 0 else f'decode{step}'}",
                                   float(diff.max()), float(limit), ok))
        if not ok:
            raise ValidationError(
                f"text_decoder ({precision}) {'prefill' if step == 0 else f'decode step {step}'}: logits differ from "
                f"PyTorch by {diff.max():.3g} at token {worst} (onnx {a[worst]:.6g}, torch {b[worst]:.6g}); "
                f"tolerance {limit:.3g}")
    return results


def logit_tolerance(fmt: str, precision: str) -> Callable[[float], float]:
    """How far one logit may move at ``precision``, given max|reference logit| (the part
    tolerances above, applied to a single step's logits)."""
    if fmt == "gguf":
        rel = GGUF_TOLERANCE.get(precision, 5e-2)
        return lambda scale: rel * scale
    tol = tolerance_for(precision)
    return lambda scale: tol.atol + tol.rel_to_scale * scale


def e2e_items(src, n_prompts: int) -> list:
    from ..data import SyntheticVQA

    per_cat = max(2, -(-n_prompts // 7))
    per_cat += per_cat % 2
    return SyntheticVQA(image_size=src.preprocess.image_size, seed=0).eval_items("test", per_cat)[: max(n_prompts, 1)]


def end_to_end(src, torch_pipe: Pipeline, other_pipe: Pipeline, n_prompts: int, precision: str, fmt: str = "onnx",
               ref_traces: dict | None = None, required: bool = True) -> dict:
    """Greedy answers of ``other_pipe`` against PyTorch; a divergence counts only where the
    reference's top-two margin exceeds the precision's tolerance (near-ties are reported)."""
    from .agreement import agreement

    threshold = E2E_THRESHOLDS.get(precision, 0.98) if required else 0.0
    row = agreement(torch_pipe, other_pipe, e2e_items(src, n_prompts), logit_tolerance(fmt, precision), precision,
                    fmt, threshold, ref_traces)
    if not required:  # a known deviation: measured and recorded, not a check
        del row["passed"]
        return row | {"measured_deviation": True}
    if not row["passed"]:
        raise ValidationError(f"end to end ({fmt} {precision}): {row['agree']}/{row['prompts']} greedy generations "
                              f"agree with PyTorch ({row['identical']} identical, {row['near_ties']} near-ties; "
                              f"{row['rate']:.1%}, needs {threshold:.0%}); first divergence: {row['mismatches'][:1]}")
    return row


def _value_row(part: str, check: str, precision: str, a: np.ndarray, b: np.ndarray, rel: float, required: bool,
               logits: bool) -> dict:
    if a.shape != b.shape:
        raise ValidationError(f"{part} (gguf {precision}): shape {list(a.shape)} differs from PyTorch "
                              f"{list(b.shape)}")
    diff = np.abs(a.astype(np.float32) - b)
    scale = float(np.abs(b).max())
    bound = rel * scale
    row = {"part": part, "precision": precision, "check": check, "max_abs_diff": float(diff.max()),
           "relative": float(diff.max()) / scale if scale else 0.0, "tolerance": bound, "format": "gguf"}
    if logits:  # what a quantized file keeps: the ranking of the logits
        row["correlation"] = float(np.corrcoef(a.reshape(-1), b.reshape(-1))[0, 1])
        row["top1_agrees"] = bool(int(a.argmax()) == int(b.argmax()))
    if not required:  # a known deviation: measured and recorded, not a check
        return row | {"measured_deviation": True}
    row["passed"] = bool(diff.max() <= bound)
    if not row["passed"]:
        idx = np.unravel_index(int(diff.argmax()), diff.shape)
        raise ValidationError(f"{part} (gguf {precision}, {check}): differs from PyTorch by {diff.max():.3g} at "
                              f"{list(idx)} (llama.cpp {a[idx]:.6g}, torch {b[idx]:.6g}); tolerance {bound:.3g}")
    return row


def validate_gguf(src, model, tok, root: Path, parts: dict, precision: str, torch_pipe: Pipeline, e2e_prompts: int,
                  progress: Callable[[str], None], ref_traces: dict | None = None) -> tuple[list[dict], dict, dict]:
    """The llama.cpp pair against PyTorch: image embeddings, the text GGUF fed the reference
    embeddings (in the semantics llama.cpp runs), the whole pair's prompt logits, then greedy
    answers. Where the GGUF has a known deviation (exporter.gguf.gguf_deviations) what the
    deviation touches is measured instead of checked; the third value is that measurement."""
    from ..core.errors import MissingDependencyError
    from ..runtimes.llamacpp_backend import LLAMA_CPP_SEMANTICS, LlamaCppSession, llamacpp_available
    from ..exporter.gguf_writer import projector_for, semantics_deviations

    if not llamacpp_available():
        raise MissingDependencyError("validating GGUF files needs llama-cpp-python; install `vlmexport[llamacpp]` "
                                     "or build with --no-validate")
    m = src.model_section()
    sem_dev = bool(semantics_deviations(src.config))
    mm_dev = bool(projector_for(src.specs).known_issue)
    sess = LlamaCppSession(root / parts["text_decoder"].file, root / parts["mmproj"].file, n_ctx=m["max_length"],
                           expected_arch=m["gguf_arch"])
    rel = GGUF_TOLERANCE.get(precision, 5e-2)
    mm_type = (getattr(parts["mmproj"], "extra", None) or {}).get("outtype", precision)
    mm_rel = GGUF_MMPROJ_TOLERANCE.get(mm_type, GGUF_TOLERANCE.get(mm_type, rel))
    pixels = _images(src, 2)
    ref = TorchSession(model)
    ref_emb, got_emb = ref.encode_images(pixels), sess.encode_images(pixels)
    pieces = render(src.template, [Turn(user="<image> and <image> Question: what is shown?", images=2)], tok,
                    src.image_tokens).pieces
    pad = src.config.pad_token_id
    layout = build_layout(pieces, src.config.expert_routing, src.config.position_ids, image_pad_id=pad)
    runs = build_layout(pieces, *LLAMA_CPP_SEMANTICS, image_pad_id=pad)  # what llama.cpp runs
    rows = [
        _value_row("mmproj", "values", precision, got_emb, ref_emb, mm_rel, not mm_dev, logits=False),
        # the text GGUF alone, on the semantics it can run: always a check
        _value_row("text_decoder", "values", precision, sess.prefill(runs, ref_emb), ref.prefill(runs, ref_emb), rel,
                   True, logits=True),
        # the whole pair against the model: the deviation, where there is one
        _value_row("gguf_pair", "prompt_logits", precision, sess.prefill(layout, got_emb), ref.prefill(layout, ref_emb),
                   rel, not (sem_dev or mm_dev), logits=True),
    ]
    progress(f"validate end to end (gguf {precision}, {e2e_prompts} prompts)")
    sess.reset()
    spec = model_spec(src.model_section())
    pipe = Pipeline(sess, tok, src.template, src.preprocess, spec, backend=f"llamacpp-{precision}")
    e2e = end_to_end(src, torch_pipe, pipe, e2e_prompts, precision, "gguf", ref_traces,
                     required=not (sem_dev or mm_dev))
    measured = {}
    if sem_dev or mm_dev:
        measured = {"format": "gguf", "precision": precision, "embeddings_max_abs_diff": rows[0]["max_abs_diff"],
                    "embeddings_relative": rows[0]["relative"], "logits_max_abs_diff": rows[2]["max_abs_diff"],
                    "logits_relative": rows[2]["relative"], "top1_agrees": rows[2]["top1_agrees"],
                    "greedy_identical": f"{e2e['identical']}/{e2e['prompts']}",
                    "greedy_agree_with_near_ties": f"{e2e['agree']}/{e2e['prompts']}"}
    return rows, e2e, measured


def validate_exports(src, root: Path, exported: Sequence, e2e_prompts: int,
                     progress: Callable[[str], None] = lambda s: None) -> dict:
    """Every format's parts against PyTorch. A format that fails is recorded under ``failed``
    (format, precision, error) and the others are still validated: the caller decides what to
    keep. ``deviations`` holds what was measured for GGUFs with a known deviation."""
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
    failed: list[dict] = []
    measured: list[dict] = []
    ref_traces: dict = {}
    torch_pipe = pipeline_from_model(model, tok, src.preprocess, src.template)
    for precision, parts in by_precision.items():
        try:
            r, row = _validate_onnx(src, root, model, tok, torch_parts, torch_pipe, parts, precision, e2e_prompts,
                                    progress, ref_traces)
        except ValidationError as exc:
            failed.append({"format": "onnx", "precision": precision, "passed": False, "error": str(exc)})
            rows += [r.to_dict() for r in getattr(exc, "results", ())]
            continue
        rows += r
        e2e.append(row)
    for precision, parts in gguf.items():
        progress(f"validate gguf ({precision})")
        try:
            g_rows, g_e2e, g_dev = validate_gguf(src, model, tok, root, parts, precision, torch_pipe, e2e_prompts,
                                                 progress, ref_traces)
        except ValidationError as exc:
            failed.append({"format": "gguf", "precision": precision, "passed": False, "error": str(exc)})
            continue
        rows += g_rows
        e2e.append(g_e2e)
        if g_dev:
            measured.append(g_dev)
    report: dict = {"parts": rows, "end_to_end": e2e}
    if failed:
        report["failed"] = failed
    if measured:
        report["deviations"] = measured
    return report


def validate_vision_parts(src, root: Path, torch_parts, parts: dict, precision: str) -> list[dict]:
    """The vision encoder and connector files of ``parts`` against the PyTorch parts (ordered
    checks, two images); one list of result rows, or a ValidationError."""
    rows: list[dict] = []
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
        rows += [r.to_dict() for r in validate_part(root / e.file, fn, inputs, outputs, _dynamic_axes(e), precision,
                                                    part)]
    return rows


def _validate_onnx(src, root: Path, model, tok, torch_parts, torch_pipe, parts: dict, precision: str,
                   e2e_prompts: int, progress: Callable[[str], None], ref_traces: dict) -> tuple[list[dict], dict]:
    rows: list[dict] = []
    progress(f"validate vision parts ({precision})")
    rows += validate_vision_parts(src, root, torch_parts, parts, precision)
    progress(f"validate text decoder ({precision})")
    sess = _ort_session(src, root, parts, precision)
    rows += [r.to_dict() for r in validate_decoder(src, model, tok, sess, precision)]
    progress(f"validate end to end ({precision}, {e2e_prompts} prompts)")
    spec = model_spec(src.model_section())
    ort_pipe = Pipeline(sess, tok, src.template, src.preprocess, spec, backend=f"onnxruntime-{precision}")
    return rows, end_to_end(src, torch_pipe, ort_pipe, e2e_prompts, precision, "onnx", ref_traces)


def _dynamic_axes(e) -> dict:
    axes: dict[str, dict[int, str]] = {}
    for spec in list(e.inputs) + list(e.outputs):
        dims = {i: d for i, d in enumerate(spec["shape"]) if isinstance(d, str)}
        if dims:
            axes[spec["name"]] = dims
    return axes
