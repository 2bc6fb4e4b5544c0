"""Exact-match accuracy per category and MME-style yes/no scores.

MME (Fu et al., 2023) asks two yes/no questions per image, one whose answer is "yes"
and one whose answer is "no". Per category: ``acc`` is the share of questions answered
right, ``acc+`` the share of images with *both* questions right, and the score is
``(acc + acc+) * 100``; the MME score sums it over categories. A reply counts as
"yes"/"no" when it starts with that word (MME's parser); anything else is wrong.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence


def normalize(text: str) -> str:
    text = text.strip().lower()
    text = re.sub(r"\s+", " ", text)
    return text.rstrip(".!?").strip()


def yes_no(text: str) -> str:
    t = normalize(text)
    if t.startswith("yes"):
        return "yes"
    if t.startswith("no"):
        return "no"
    return "other"


@dataclass(frozen=True)
class Prediction:
    image_id: str
    category: str
    question: str
    answer: str
    prediction: str
    kind: str = "open"  # "open" | "yesno"
    pair_id: str | None = None

    @property
    def correct(self) -> bool:
        if self.kind == "yesno":
            return yes_no(self.prediction) == normalize(self.answer)
        return normalize(self.prediction) == normalize(self.answer)


@dataclass
class EvalReport:
    overall: float
    n: int
    per_category: dict[str, dict[str, float]]
    mme: dict[str, dict[str, float]]
    mme_score: float
    meta: dict = field(default_factory=dict)
    predictions: list[dict] = field(default_factory=list)

    def to_json(self, with_predictions: bool = True) -> str:
        d = asdict(self)
        if not with_predictions:
            d.pop("predictions")
        return json.dumps(d, indent=2)

    def table(self) -> str:
        """A plain-text table (the CLI renders the same rows with rich)."""
        rows = [("category", "exact match", "n")]
        for cat, r in self.per_category.items():
            rows.append((cat, f"{r['accuracy'] * 100:.1f}%", str(int(r["n"]))))
        rows.append(("overall", f"{self.overall * 100:.1f}%", str(self.n)))
        lines = _fmt(rows)
        if self.mme:
            mrows = [("MME category", "acc", "acc+", "score")]
            for cat, r in self.mme.items():
                mrows.append((cat, f"{r['acc'] * 100:.1f}", f"{r['acc_plus'] * 100:.1f}", f"{r['score']:.1f}"))
            mrows.append(("MME total", "", "", f"{self.mme_score:.1f}"))
            lines += [""] + _fmt(mrows)
        return "\n".join(lines)


def _fmt(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for j, r in enumerate(rows):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def score(predictions: Iterable[Prediction], meta: dict | None = None) -> EvalReport:
    preds = list(predictions)
    by_cat: dict[str, list[Prediction]] = defaultdict(list)
    for p in preds:
        by_cat[p.category].append(p)
    per_category = {cat: {"accuracy": sum(p.correct for p in ps) / len(ps), "n": len(ps)}
                    for cat, ps in sorted(by_cat.items())}
    overall = sum(p.correct for p in preds) / len(preds) if preds else 0.0
    mme: dict[str, dict[str, float]] = {}
    for cat, ps in sorted(by_cat.items()):
        pairs: dict[str, list[Prediction]] = defaultdict(list)
        for p in ps:
            if p.kind == "yesno":
                pairs[p.pair_id or p.image_id].append(p)
        if not pairs:
            continue
        questions = [p for group in pairs.values() for p in group]
        acc = sum(p.correct for p in questions) / len(questions)
        acc_plus = sum(all(p.correct for p in group) for group in pairs.values()) / len(pairs)
        mme[cat] = {"acc": acc, "acc_plus": acc_plus, "score": (acc + acc_plus) * 100, "n_images": len(pairs)}
    return EvalReport(overall=overall, n=len(preds), per_category=per_category, mme=mme,
                      mme_score=sum(r["score"] for r in mme.values()), meta=dict(meta or {}),
                      predictions=[asdict(p) | {"correct": p.correct} for p in preds])
