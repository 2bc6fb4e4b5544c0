"""Greedy agreement of an exported model with the PyTorch reference, near-ties told apart.

Both pipelines answer the same prompts greedily, token by token. Where the answers first
differ, the reference's top-two logit margin at that step decides what the difference
means: a margin within the precision's tolerance (``tie_bound``: both logits may move by
the tolerance, so two logits closer than twice that can swap) is a *near-tie*: the
reference itself had no clear choice, and fp16 rounding or llama.cpp's f16 KV cache may
pick either. Near-ties are reported (count, and where: prompt, step, margin) and do not
count as divergences. A wider margin is a *divergence*, and only divergences count against
the agreement threshold.

    row = agreement(torch_pipe, other_pipe, items, tie_bound=lambda scale: 1e-2 * scale,
                    precision="fp16", fmt="onnx", threshold=0.98)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..core.prompt import Turn

MAX_NEW_TOKENS = 16


@dataclass(frozen=True)
class Trace:
    """One greedy generation: the choice at every step (the stop token included, when one was
    chosen), and the top-two margin and max|logit| of each step's logits."""

    choices: tuple[int, ...]
    margins: tuple[float, ...]
    scales: tuple[float, ...]
    stopped: bool

    @property
    def tokens(self) -> tuple[int, ...]:
        """The generated tokens (without the stop token)."""
        return self.choices[:-1] if self.stopped else self.choices


def _margin(logits: np.ndarray) -> tuple[int, float, float]:
    x = np.asarray(logits, np.float64).reshape(-1)
    top2 = np.partition(x, -2)[-2:]
    return int(np.argmax(x)), float(top2[1] - top2[0]), float(np.abs(x).max())


def greedy_trace(pipe, prompt: str, images: Sequence, max_new_tokens: int = MAX_NEW_TOKENS) -> Trace:
    """Greedy decoding through ``pipe``'s session, as ``core.generation.generate_tokens`` runs it
    (same stop tokens, same context limit), recording each step's margin."""
    layout, pixels = pipe.prepare([Turn(user=prompt, images=len(images))], images)
    session = pipe.session
    embeds = session.encode_images(pixels) if pixels is not None else None
    stops = set(pipe.defaults.stop_token_ids or (pipe.tokenizer.eos_id,))
    session.reset()
    logits = session.prefill(layout, embeds)
    position, length = layout.next_position, len(layout)
    choices, margins, scales = [], [], []
    for i in range(max_new_tokens):
        token, margin, scale = _margin(logits)
        choices.append(token)
        margins.append(margin)
        scales.append(scale)
        if token in stops:
            return Trace(tuple(choices), tuple(margins), tuple(scales), True)
        if i + 1 == max_new_tokens or length >= session.max_length:
            break
        logits = session.decode(token, position)
        position += 1
        length += 1
    return Trace(tuple(choices), tuple(margins), tuple(scales), False)


def first_difference(ref: Trace, got: Trace) -> int | None:
    """The first step whose greedy choice differs, or None when the generations are equal."""
    for k, (a, b) in enumerate(zip(ref.choices, got.choices)):
        if a != b:
            return k
    return None if len(ref.choices) == len(got.choices) else min(len(ref.choices), len(got.choices))


def agreement(ref_pipe, pipe, items: Sequence, tie_bound: Callable[[float], float], precision: str, fmt: str,
              threshold: float, ref_traces: dict | None = None, max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    """The end-to-end row for ``pipe`` against ``ref_pipe`` over ``items`` (objects with
    ``question`` and ``image``). ``tie_bound(max|reference logit|)`` is the tolerance a logit may
    move by at that precision. ``ref_traces`` caches the reference's traces between calls."""
    cache = ref_traces if ref_traces is not None else {}
    identical, near, diverged = 0, [], []
    label = pipe.backend or fmt
    for i, it in enumerate(items):
        key = (i, it.question)
        if key not in cache:
            cache[key] = greedy_trace(ref_pipe, it.question, [it.image], max_new_tokens)
        ref = cache[key]
        got = greedy_trace(pipe, it.question, [it.image], max_new_tokens)
        k = first_difference(ref, got)
        if k is None:
            identical += 1
            continue
        if k >= len(ref.margins):  # the reference ran out of steps first: nothing to weigh
            k = len(ref.margins) - 1
        bound = 2.0 * tie_bound(ref.scales[k])
        where = {"prompt": i, "step": k, "margin": round(ref.margins[k], 6), "tolerance": round(bound, 6)}
        if ref.margins[k] <= bound:
            near.append(where)
        else:
            diverged.append({**where, "question": it.question,
                             "torch": pipe.tokenizer.decode(list(ref.tokens)),
                             label: pipe.tokenizer.decode(list(got.tokens))})
    n = len(items)
    agree = identical + len(near)
    rate = agree / n if n else 1.0
    return {"format": fmt, "backend": label, "precision": precision, "prompts": n, "identical": identical,
            "near_ties": len(near), "diverged": len(diverged), "agree": agree, "rate": rate,
            "threshold": threshold, "passed": rate >= threshold, "required": threshold > 0,
            "near_tie_at": near, "mismatches": diverged[:5]}
