"""Accuracy gates: a quantized part set scored against fp32 on test-split prompts.

Scores (test split, never used for calibration):
- ``top1_agreement``: share of prompts whose last-position argmax equals fp32's;
- ``mean_cosine``: mean cosine similarity of the last-position logits;
- ``accuracy`` / ``accuracy_fp32`` / ``accuracy_drop_points``: exact-match task accuracy
  of greedy answers through the evaluation API (``evaluation.runner.evaluate``), in
  percentage points.

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


def score(ref_pipeline, q_pipeline, items: Sequence, accuracy: bool = True, ref_accuracy: float | None = None,
          max_new_tokens: int = 10) -> dict:
    """Logit scores plus exact-match accuracy (percent) of both pipelines on ``items``."""
    out = logit_scores(ref_pipeline, q_pipeline, items)
    if accuracy:
        from ..evaluation.runner import evaluate

        if ref_accuracy is None:
            ref_accuracy = 100.0 * evaluate(ref_pipeline, items, max_new_tokens).overall
        acc = 100.0 * evaluate(q_pipeline, items, max_new_tokens).overall
        out.update(accuracy=acc, accuracy_fp32=ref_accuracy, accuracy_drop_points=ref_accuracy - acc)
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
