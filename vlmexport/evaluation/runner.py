"""Run a pipeline (any backend) over evaluation items and score the answers."""

from __future__ import annotations

import time
from typing import Callable, Protocol, Sequence

from .metrics import EvalReport, Prediction, score


class EvalItemLike(Protocol):
    image_id: str
    image: object
    category: str
    question: str
    answer: str
    kind: str
    pair_id: str | None


def evaluate(pipeline, items: Sequence[EvalItemLike], max_new_tokens: int = 10,
             progress: Callable[[int, int], None] | None = None, meta: dict | None = None) -> EvalReport:
    """Greedy-answer every item (one image + one question, no history; or, for an item with a
    ``context`` of (image, question, answer) turns, that history first: a multi-image prompt) and score it."""
    preds = []
    t0 = time.perf_counter()
    for i, it in enumerate(items):
        context = getattr(it, "context", ())
        if context:
            history = [m for img, q, a in context for m in ({"role": "user", "content": q, "images": [img]},
                                                             {"role": "assistant", "content": a})]
            out = pipeline.chat(history + [{"role": "user", "content": it.question, "images": [it.image]}],
                                max_new_tokens=max_new_tokens, temperature=0.0)
        else:
            out = pipeline.generate(it.question, [it.image], max_new_tokens=max_new_tokens, temperature=0.0)
        preds.append(Prediction(it.image_id, it.category, it.question, it.answer, out, it.kind, it.pair_id))
        if progress is not None:
            progress(i + 1, len(items))
    dt = time.perf_counter() - t0
    info = {"backend": getattr(pipeline, "backend", ""), "seconds": round(dt, 2), "items": len(items)}
    info.update(meta or {})
    return score(preds, info)
