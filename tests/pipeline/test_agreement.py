"""End-to-end agreement (exporter/agreement.py): a divergence counts only where the
reference's top-two margin exceeds the precision's tolerance; near-ties are reported.

The reference is a real torch pipeline of a tiny model. The "exported" pipeline is the same
model behind a session that swaps the top two logits at one decoding step: the smallest
change that makes greedy answers differ there. Whether that difference is a near-tie or a
divergence is then decided only by the tolerance against the reference's own margin at
that step, which is what the tests vary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from vlmexport.pipeline.agreement import agreement, first_difference, greedy_trace
from vlmexport.runtimes.pipeline import Pipeline
from vlmexport.runtimes.torch_backend import pipeline_from_model


@dataclass
class Item:
    question: str
    image: np.ndarray


class SwapAtStep:
    """A DecoderSession that runs ``inner`` but swaps the two largest logits at step ``step``
    (0: the prefill's logits, k: the k-th decode)."""

    def __init__(self, inner, step: int):
        self.inner, self.step, self.k = inner, step, 0
        self.max_length = inner.max_length

    def encode_images(self, pixels):
        return self.inner.encode_images(pixels)

    def reset(self):
        self.k = 0
        self.inner.reset()

    def _maybe_swap(self, logits):
        logits = np.array(logits, copy=True)
        if self.k == self.step:
            a, b = np.argsort(logits)[-2:]
            logits[a], logits[b] = logits[b], logits[a]
        self.k += 1
        return logits

    def prefill(self, layout, embeds):
        return self._maybe_swap(self.inner.prefill(layout, embeds))

    def decode(self, token, position):
        return self._maybe_swap(self.inner.decode(token, position))


@pytest.fixture(scope="module")
def setup(tiny_model, tokenizer, preprocess_config):
    model = tiny_model("cogvlm", seed=11, jitter=True)
    ref = pipeline_from_model(model, tokenizer, preprocess_config, max_length=256)
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    items = [Item("What colour is the shape?", image)]
    trace = greedy_trace(ref, items[0].question, [image], max_new_tokens=6)
    assert len(trace.choices) >= 3, "the tiny model should not stop at once"
    return model, ref, items, trace


def swapped(setup, step: int) -> Pipeline:
    model, ref, _, _ = setup
    other = pipeline_from_model(model, ref.tokenizer, ref.preprocess_config, max_length=256)
    return Pipeline(SwapAtStep(other.session, step), ref.tokenizer, ref.template, ref.preprocess_config, ref.spec,
                    backend="swapped-fp16")


def test_identical_generations_agree(setup):
    model, ref, items, _ = setup
    same = pipeline_from_model(model, ref.tokenizer, ref.preprocess_config, max_length=256)
    row = agreement(ref, same, items, lambda s: 0.0, "fp32", "onnx", threshold=1.0, max_new_tokens=6)
    assert (row["identical"], row["near_ties"], row["diverged"], row["passed"]) == (1, 0, 0, True)


def test_a_flip_within_the_tolerance_is_a_near_tie_and_is_reported(setup):
    _, ref, items, trace = setup
    margin = trace.margins[1]
    # each logit may move by `margin`: the top two of the reference may swap, so the flip is no divergence
    row = agreement(ref, swapped(setup, 1), items, lambda s: margin, "fp16", "onnx", threshold=1.0,
                    max_new_tokens=6)
    assert (row["identical"], row["near_ties"], row["diverged"], row["agree"]) == (0, 1, 0, 1)
    assert row["passed"] and row["near_tie_at"] == [{"prompt": 0, "step": 1, "margin": round(margin, 6),
                                                    "tolerance": round(2 * margin, 6)}]
    assert row["backend"] == "swapped-fp16" and row["format"] == "onnx"


def test_a_flip_beyond_the_tolerance_is_a_divergence_labelled_with_the_backend(setup):
    _, ref, items, trace = setup
    margin = trace.margins[1]
    row = agreement(ref, swapped(setup, 1), items, lambda s: margin / 4, "fp16", "gguf", threshold=1.0,
                    max_new_tokens=6)
    assert (row["identical"], row["near_ties"], row["diverged"], row["passed"]) == (0, 0, 1, False)
    mismatch = row["mismatches"][0]
    assert mismatch["step"] == 1 and set(mismatch) >= {"torch", "swapped-fp16"} and "onnx" not in mismatch


def test_first_difference_counts_an_early_stop(setup):
    _, ref, items, trace = setup
    other = greedy_trace(swapped(setup, 2), items[0].question, [items[0].image], max_new_tokens=6)
    assert first_difference(trace, trace) is None
    assert first_difference(trace, other) == 2
