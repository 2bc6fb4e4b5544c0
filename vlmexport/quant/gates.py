"""Accuracy gates: a quantized part set scored against fp32 on test-split prompts.

Scores (test split, never used for calibration):
- ``top1_agreement``: share of prompts whose last-position argmax equals fp32's;
- ``mean_cosine``: mean cosine similarity of the last-position logits;
- ``accuracy`` / ``accuracy_fp32`` / ``accuracy_drop_points``: exact-match task accuracy
  of greedy answers through the evaluation API (``evaluation.runner.evaluate``), in
  percentage points, also per category;
- ``mme_score`` / ``mme_score_fp32`` / ``mme_drop``: ``vlmexport eval``'s MME-style score
  (acc + acc+ of the yes/no pairs, x100, summed over categories), where the prompts hold pairs.

Default gates: INT8 may lose at most 0.5 accuracy points, INT4 at most 1.5. Optional
``min_top1`` / ``min_cosine`` gates. A failing gate raises :class:`QuantizationGateError`
(one line naming the gate and the measured value) unless ``allow_degraded``, which
records the failure in the scores instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..core.errors import VlmexportError


class QuantizationGateError(VlmexportError):
    """A quantized part set lost more accuracy than its gate allows."""


@dataclass(frozen=True)
class Gate:
    max_accuracy_drop: float | None = None  # percentage points
    min_top1: float | None = None  # 0..1
    min_cosine: float | None = None


DEFAULT_GATES = {"int8": Gate(max_accuracy_drop=0.5), "int4": Gate(max_accuracy_drop=1.5)}


def logit_scores(ref_pipeline, q_pipeline, items: Sequence) -> dict:
    """Top-1 agreement and mean cosine of the last prompt position's logits (one image + question each)."""
    from ..core.prompt import Turn

    agree, cos = 0, []
    for it in items:
        layout, px = ref_pipeline.prepare([Turn(user=it.question, images=1)], [it.image])
        a = np.asarray(ref_pipeline.session.prefill(layout, ref_pipeline.session.encode_images(px)), np.float64)
        b = np.asarray(q_pipeline.session.prefill(layout, q_pipeline.session.encode_images(px)), np.float64)
        ref_pipeline.session.reset()
        q_pipeline.session.reset()
        agree += int(a.argmax() == b.argmax())
        cos.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)))
    n = max(len(items), 1)
    return {"prompts": len(items), "top1_agreement": agree / n, "mean_cosine": float(np.mean(cos)) if cos else 1.0,
            "min_cosine": float(np.min(cos)) if cos else 1.0}


def task_scores(pipeline, items: Sequence, max_new_tokens: int = 10) -> dict:
    """``vlmexport eval``'s scores of greedy answers on ``items``: exact match overall and per
    category (percent), and the MME-style score where the items hold yes/no pairs."""
    from ..evaluation.runner import evaluate

    r = evaluate(pipeline, items, max_new_tokens)
    out = {"accuracy": 100.0 * r.overall,
           "per_category": {c: round(100.0 * v["accuracy"], 2) for c, v in r.per_category.items()}}
    if r.mme:
        out["mme_score"] = r.mme_score
    return out


def score(ref_pipeline, q_pipeline, items: Sequence, accuracy: bool = True, reference: dict | None = None,
          max_new_tokens: int = 10) -> dict:
    """Logit scores plus the task scores of both pipelines on ``items``: ``accuracy`` and
    ``mme_score`` with their fp32 values and drops, exact match per category. ``reference``:
    the fp32 pipeline's :func:`task_scores`, when already computed for another precision."""
    out = logit_scores(ref_pipeline, q_pipeline, items)
    if accuracy:
        ref = reference if reference is not None else task_scores(ref_pipeline, items, max_new_tokens)
        mine = task_scores(q_pipeline, items, max_new_tokens)
        out.update(accuracy=mine["accuracy"], accuracy_fp32=ref["accuracy"],
                   accuracy_drop_points=ref["accuracy"] - mine["accuracy"])
        if "mme_score" in mine and "mme_score" in ref:
            out.update(mme_score=mine["mme_score"], mme_score_fp32=ref["mme_score"],
                       mme_drop=ref["mme_score"] - mine["mme_score"])
        out.update(per_category=mine["per_category"], per_category_fp32=ref["per_category"])
    return out


def check_gates(scores: dict, precision: str, gate: Gate | None = None, allow_degraded: bool = False) -> dict:
    """Apply ``gate`` (default for the precision) to ``scores``; returns scores + gate results."""
    gate = gate or DEFAULT_GATES.get(precision, Gate())
    checks = []
    if gate.max_accuracy_drop is not None and "accuracy_drop_points" in scores:
        checks.append(("max_accuracy_drop", scores["accuracy_drop_points"], gate.max_accuracy_drop,
                       scores["accuracy_drop_points"] <= gate.max_accuracy_drop + 1e-9))
    if gate.min_top1 is not None:
        checks.append(("min_top1", scores["top1_agreement"], gate.min_top1, scores["top1_agreement"] >= gate.min_top1))
    if gate.min_cosine is not None:
        checks.append(("min_cosine", scores["mean_cosine"], gate.min_cosine, scores["mean_cosine"] >= gate.min_cosine))
    results = [{"gate": n, "measured": round(float(v), 6), "limit": lim, "passed": bool(ok)}
               for n, v, lim, ok in checks]
    failed = [r for r in results if not r["passed"]]
    if failed and not allow_degraded:
        f = failed[0]
        raise QuantizationGateError(f"{precision}: gate {f['gate']} failed: measured {f['measured']:.4g}, limit "
                                    f"{f['limit']}; loosen the recipe (keep more layers in full precision) or pass "
                                    "--allow-degraded")
    return {**scores, "gates": results, "passed": not failed, "degraded": bool(failed)}
