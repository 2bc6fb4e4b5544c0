"""Batched decode (one decoder run for several sequences) gives each sequence the logits it gets alone."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

import vlmexport
from vlmexport.cli import app
from vlmexport.core.prompt import Turn
from vlmexport.runtimes.onnxruntime_batch import BatchedOrtSession


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tokenizer_path, tiny_model):
    from vlmexport.core.preprocess import PreprocessConfig
    from vlmexport.models.checkpoint import save_pretrained

    root = tmp_path_factory.mktemp("batch")
    src = save_pretrained(tiny_model("cogvlm", seed=2, jitter=True), root / "model", tokenizer_path,
                          PreprocessConfig(image_size=32))
    out = root / "bundle"
    r = CliRunner().invoke(app, ["build", str(src), "--out", str(out), "--format", "onnx", "--precision", "fp32",
                                 "--no-validate", "--no-reference"])
    assert r.exit_code == 0, r.output
    return out


def greedy(first: np.ndarray, step, n: int) -> tuple[list[int], list[np.ndarray]]:
    toks, logits = [], [first]
    for i in range(n):
        toks.append(int(np.argmax(logits[-1])))
        if i + 1 < n:
            logits.append(step(toks[-1], i))
    return toks, logits


def test_batched_decode_equals_one_sequence_at_a_time(bundle, images):
    prompts = [("What colour is it?", [images[0]]), ("<image> and <image>: which is larger, tell me", images[:2]),
               ("hi", [])]
    pipe = vlmexport.load(bundle, backend="onnxruntime", threads=1)
    jobs = []
    for text, imgs in prompts:
        layout, pixels = pipe.prepare([Turn(text, images=len(imgs))], imgs)
        embeds = pipe.session.encode_images(pixels) if pixels is not None else None
        jobs.append((layout, embeds))
    alone = []
    for layout, embeds in jobs:
        s = pipe.session
        first = s.prefill(layout, embeds)
        alone.append(greedy(first, lambda tok, i, s=s, lay=layout: s.decode(tok, lay.next_position + i), 6))

    batched = BatchedOrtSession(vlmexport.load(bundle, backend="onnxruntime", threads=1).session, slots=4)
    slots = (3, 0, 2)  # slot 1 stays empty: a row without a sequence inside the batch
    firsts = {slot: batched.prefill(slot, layout, embeds) for slot, (layout, embeds) in zip(slots, jobs)}
    toks = {slot: [int(np.argmax(firsts[slot]))] for slot in slots}
    logits = {slot: [firsts[slot]] for slot in slots}
    for i in range(5):
        out = batched.decode({slot: (toks[slot][-1], jobs[k][0].next_position + i) for k, slot in enumerate(slots)})
        for slot, lg in out.items():
            logits[slot].append(lg)
            toks[slot].append(int(np.argmax(lg)))
    for k, slot in enumerate(slots):
        assert toks[slot] == alone[k][0], k
        np.testing.assert_allclose(np.stack(logits[slot]), np.stack(alone[k][1]), atol=1e-4, rtol=1e-4)
    # a finished sequence leaves; the others go on unaffected
    batched.release(0)
    rest = batched.decode({3: (toks[3][-1], jobs[0][0].next_position + 5)})
    assert set(rest) == {3} and np.isfinite(rest[3]).all()
