"""The question-conditioned attention loss: where each answer is in the image
(``data.labels.question_regions``), the targets a batch carries, and the probe's
attention against the attention the model itself computes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import vlmexport.models.cogvlm as cogvlm_module
from vlmexport.core.errors import ConfigError
from vlmexport.core.preprocess import PreprocessConfig
from vlmexport.core.tokenizer import Tokenizer
from vlmexport.data import CATEGORIES, SyntheticVQA
from vlmexport.data.labels import question_referents, question_regions
from vlmexport.data.synthetic import questions
from vlmexport.models import get_architecture, seeded_init
from vlmexport.training.batching import IGNORE, ModelLayoutInfo, answer_query_positions
from vlmexport.training.datasets import SyntheticTrainData
from vlmexport.training.objectives import loss_on_batch, objective_for
from vlmexport.training.stages import Stage
from vlmexport.training.trainer import TrainConfig, train

SIZE, PATCH = 32, 8  # the tiny ViT: a 4 x 4 patch grid
GRID = SIZE // PATCH
PRE = PreprocessConfig(image_size=SIZE)


def tiny(arch: str = "cogvlm"):
    A = get_architecture(arch)
    return seeded_init(A(A.tiny_config(max_position_embeddings=512)), 0)


def data_for(model, tok, attention: bool = True, categories=()):
    return SyntheticTrainData(SyntheticVQA(image_size=SIZE, seed=0), tok, model.default_chat_template(),
                              ModelLayoutInfo.of(model), PRE, turns=(4, 8), attention_grid=GRID if attention else None,
                              attention_categories=categories)


@pytest.fixture
def tok(tokenizer_path):
    return Tokenizer(tokenizer_path)


def _centre_patch(obj: dict, grid: int) -> int:
    from vlmexport.data.render import GRID as SPEC_GRID

    return int(obj["y"] * grid // SPEC_GRID) * grid + int(obj["x"] * grid // SPEC_GRID)


def test_regions_follow_the_objects_the_question_names():
    gen = SyntheticVQA(image_size=96, seed=0)
    seen = set()
    for i in range(200):
        spec, sample = gen.spec("train", i), gen.sample("train", i)
        for qa in sample.qas:
            regions = question_regions(spec, qa.question, 8)
            seen.add((qa.category, len(regions)))
            if qa.category == "position":
                a, b = qa.question[len("Is the "):].split(" ")[:2], qa.question.rstrip("?").split(" ")[-2:]
                objs = [next(o for o in spec["objects"] if [o["colour"], o["shape"]] == name) for name in (a, b)]
                assert [_centre_patch(o, 8) in r for o, r in zip(objs, regions)] == [True, True]
            elif qa.category == "colour":
                shape = qa.question.rstrip("?").split(" ")[-1]
                obj = next(o for o in spec["objects"] if o["shape"] == shape)
                assert obj["colour"] == qa.answer
                assert _centre_patch(obj, 8) in regions[0]
            elif qa.category == "existence":
                assert len(regions) == (1 if qa.answer == "yes" else 0)
            elif qa.category == "count":
                assert len(regions) == 1 and len(regions[0]) >= int(qa.answer)
    assert ("position", 2) in seen and ("reading", 0) in seen and ("chart", 1) in seen


def test_batch_targets_sit_on_the_answer_positions_and_image_patches(tok):
    model = tiny()
    data = data_for(model, tok)
    batch = data.batch(0, 6)
    t = batch.attention_targets
    assert len(t.rows) > 0
    for row, pos, head, keys in zip(t.rows.tolist(), t.query_pos.tolist(), t.heads.tolist(), t.keys):
        reading = data.gen.spec("train", row)["kind"] == "text"  # a target per answer token, not per answer
        assert batch.targets[row, pos] != IGNORE and (reading or batch.targets[row, pos - 1] == IGNORE)
        assert head in (0, 1)
        assert bool(batch.is_image[row][keys].all()) and 0 < int(keys.sum()) <= GRID * GRID
    # one query position per answer
    ex = data.example(0)
    assert len(answer_query_positions(ex.targets)) == len(data.turns_for(0, data.gen.sample("train", 0)))


def attention_qk(model, batch, monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each decoder layer's (q, k), as the model's own attention receives them, for one batch."""
    captured = []
    real = cogvlm_module.attention

    def spy(q, k, v, start):
        captured.append((q.detach(), k.detach()))
        return real(q, k, v, start)

    monkeypatch.setattr(cogvlm_module, "attention", spy)
    loss_on_batch(model, batch)
    return captured


def test_probe_reproduces_the_models_attention(tok, monkeypatch):
    model = tiny()
    batch = data_for(model, tok).batch(0, 4)
    objective = objective_for(Stage.SCRATCH, model, 0.0, attention_weight=1.0).train()
    captured = attention_qk(model, batch, monkeypatch)
    q, k = captured[-1]  # the last decoder layer's
    t = batch.attention_targets
    logp, keys = objective._probe.log_probs(t, batch.is_image)
    for i in range(len(t.rows)):
        r, p, h = int(t.rows[i]), int(t.query_pos[i]), int(t.heads[i])
        image = torch.nonzero(batch.is_image[r]).flatten()
        scores = q[r, h, p] @ k[r, h, image].T / math.sqrt(q.shape[-1])
        torch.testing.assert_close(torch.log_softmax(scores, -1), logp[i], atol=1e-5, rtol=1e-5)
        assert torch.equal(keys[i], t.keys[i][image])


def test_attention_loss_trains_the_head_towards_the_answer(tmp_path, tok):
    """A few steps on the attention loss alone raise the mass heads 0/1 put on the answer patches."""
    model = tiny()
    data = data_for(model, tok, categories=[c for c in CATEGORIES if c != "reading"])  # 4 x 4 px text: unreadable
    objective = objective_for(Stage.SCRATCH, model, 0.0, attention_weight=1.0).train()

    def mass() -> float:
        batch = data.batch(1000, 8)
        model.train()  # the probe reads the layer in training mode only
        with torch.no_grad():
            loss_on_batch(model, batch)
            logp, keys = objective._probe.log_probs(batch.attention_targets, batch.is_image)
        return float(torch.logsumexp(logp.masked_fill(~keys, float("-inf")), -1).exp().mean())

    before = mass()
    train(model, data, TrainConfig(steps=25, batch_size=8, lr=3e-3, warmup_steps=1, save_every=100, log_every=5,
                                   precision="fp32"), tmp_path / "run", attention_weight=5.0)
    assert mass() > before + 0.05


def test_attention_loss_needs_expert_attention():
    with pytest.raises(ConfigError, match="attention_weight 0"):
        objective_for(Stage.SCRATCH, tiny("llava"), 0.0, attention_weight=1.0)


def test_reading_targets_read_the_text_token_by_token(tok):
    """Each answer token of a reading question reads the characters it spells, left to right
    (the test tokenizer spells most words in several pieces, numbers digit by digit)."""
    model = tiny()
    gen = SyntheticVQA(image_size=SIZE, seed=0)
    data = SyntheticTrainData(gen, tok, model.default_chat_template(), ModelLayoutInfo.of(model), PRE, turns=(1, 1),
                              attention_grid=GRID)
    seen = 0
    for i in range(40):
        spec = gen.spec("train", i)
        if spec["kind"] != "text":
            continue
        seen += 1
        batch = data.batch(i, 1)
        t = batch.attention_targets
        assert torch.equal(t.keys[0::2], t.keys[1::2])  # head 1 reads what head 0 reads
        patches = torch.nonzero(batch.is_image[0]).flatten()[1:-1]
        cols = [sorted({int(torch.nonzero(patches == p)[0]) % GRID for p in torch.nonzero(k).flatten()})
                for k in t.keys[0::2]]
        pieces = [tok.id_to_piece(int(batch.targets[0, p])) for p in t.query_pos[0::2]]
        assert "".join(pieces).replace("\u2581", "") == spec["text"]  # every character, EOS not
        if pieces[0] == "\u2581":
            assert cols[0] == cols[1]  # a lone space reads ahead
        assert all(a[0] <= b[0] and a[-1] <= b[-1] for a, b in zip(cols, cols[1:]))
    assert seen


def test_word_targets_name_the_referents_in_the_question(tok):
    model = tiny()
    batch = SyntheticTrainData(SyntheticVQA(image_size=SIZE, seed=0), tok, model.default_chat_template(), ModelLayoutInfo.of(model), PRE,
                               turns=(4, 8), word_targets=True).batch(0, 6)
    t = batch.word_targets
    spec_of = [SyntheticVQA(image_size=SIZE, seed=0).spec("train", i) for i in range(6)]
    assert len(t.rows) > 0
    for row, pos, keys in zip(t.rows.tolist(), t.query_pos.tolist(), t.keys):
        hits = torch.nonzero(keys).flatten().tolist()
        assert hits and max(hits) < pos and not bool(batch.is_image[row][keys].any())
        spelt = "".join(tok.id_to_piece(int(batch.input_ids[row, h])) for h in hits).replace("\u2581", "")
        named = {"".join(words) for qa in questions(spec_of[row]) for words in question_referents(qa.question)}
        assert spelt in named


def test_causal_probe_reproduces_the_first_layers_attention(tok, monkeypatch):
    model = tiny()
    batch = SyntheticTrainData(SyntheticVQA(image_size=SIZE, seed=0), tok, model.default_chat_template(),
                               ModelLayoutInfo.of(model), PRE, turns=(4, 8), word_targets=True).batch(0, 4)
    objective = objective_for(Stage.SCRATCH, model, 0.0, word_attention_weight=1.0).train()
    captured = attention_qk(model, batch, monkeypatch)
    q, k = captured[0]  # the first decoder layer's
    t = batch.word_targets
    logp, _ = objective._word_probe.log_probs_causal(t)
    for i in range(len(t.rows)):
        r, p, h = int(t.rows[i]), int(t.query_pos[i]), int(t.heads[i])
        scores = q[r, h, p] @ k[r, h, : p + 1].T / math.sqrt(q.shape[-1])
        torch.testing.assert_close(torch.log_softmax(scores, -1), logp[i, : p + 1], atol=1e-5, rtol=1e-5)
        assert bool(torch.isinf(logp[i, p + 1:]).all())


def test_coordinate_labels_give_each_patch_its_row_and_column():
    from vlmexport.data.labels import label_sets, stacked_patch_labels

    gen = SyntheticVQA(image_size=96, seed=0)
    labels = stacked_patch_labels([gen.spec("train", i) for i in range(3)], 8, coordinates=True)
    assert set(labels) == set(label_sets(8, coordinates=True)) == {"colour", "shape", "char", "row", "col"}
    assert labels["row"][0].view(8, 8)[5].tolist() == [5] * 8 and labels["col"][2].view(8, 8)[:, 3].tolist() == [3] * 8
    assert set(stacked_patch_labels([gen.spec("train", 0)], 8)) == {"colour", "shape", "char"}


def test_centre_labels_mark_one_patch_per_object_with_its_shape():
    from collections import Counter

    from vlmexport.data.labels import CENTRE_LABELS, label_sets, patch_labels, stacked_patch_labels
    from vlmexport.data.render import SHAPES

    gen = SyntheticVQA(image_size=96, seed=0)
    specs = [s for s in (gen.spec("train", i) for i in range(60)) if s["kind"] in ("scene", "count")][:8]
    labels = stacked_patch_labels(specs, 8, coordinates=True, centres=True)
    assert set(labels) == set(label_sets(8, True, True)) == {"colour", "shape", "char", "row", "col", "centre"}
    assert label_sets(8, centres=True)["centre"] == CENTRE_LABELS == 1 + len(SHAPES)
    for spec, centre in zip(specs, labels["centre"]):
        marked = Counter(SHAPES[int(v) - 1] for v in centre if v)  # one patch per object, whatever its size
        assert marked == Counter(o["shape"] for o in spec["objects"])
        for o in spec["objects"]:
            assert int(centre[_centre_patch(o, 8)]) == 1 + SHAPES.index(o["shape"])
    text = next(s for s in (gen.spec("train", i) for i in range(40)) if s["kind"] == "text")
    assert not patch_labels(text, 8, centres=True)["centre"].any()
    # by hand: spec units are 384 per side, so an 8 x 8 grid has 48-unit patches
    for (x, y), (row, col) in {(200, 100): (2, 4), (47, 48): (1, 0), (383, 383): (7, 7)}.items():
        one = dict(specs[0], objects=[dict(specs[0]["objects"][0], x=x, y=y)])
        centre = patch_labels(one, 8, centres=True)["centre"]
        assert centre[row, col] == 1 + SHAPES.index(one["objects"][0]["shape"]) and (centre > 0).sum() == 1


def test_pool_categories_that_would_do_nothing_are_an_error(tok):
    model = tiny()
    args = (SyntheticVQA(image_size=SIZE, seed=0), tok, model.default_chat_template(), ModelLayoutInfo.of(model), PRE)
    with pytest.raises(ConfigError, match="attention_weight > 0"):
        SyntheticTrainData(*args, pool_categories=("count",))
    with pytest.raises(ConfigError, match="get no pooled target"):
        SyntheticTrainData(*args, attention_grid=GRID, attention_categories=("colour",), pool_categories=("count",))
    with pytest.raises(ConfigError, match="get no pooled target"):
        SyntheticTrainData(*args, attention_grid=GRID, pool_categories=("reading",))


def test_pooled_count_targets_spread_head_0_over_every_patch(tok):
    model = tiny()
    data = SyntheticTrainData(SyntheticVQA(image_size=SIZE, seed=0), tok, model.default_chat_template(),
                              ModelLayoutInfo.of(model), PRE, turns=(4, 8), attention_grid=GRID,
                              pool_categories=("count",), category_weights={"count": 50.0})
    batch = data.batch(0, 8)
    t = batch.attention_targets
    assert t.spread is not None and bool(t.spread.any())
    for row, head, keys, spread in zip(t.rows.tolist(), t.heads.tolist(), t.keys, t.spread.tolist()):
        if spread:  # a count question's head 0: every patch of the image (not boi / eoi)
            assert head == 0 and int(keys.sum()) == GRID * GRID and bool(batch.is_image[row][keys].all())
    heads_1 = {(r, p) for r, p, h in zip(t.rows.tolist(), t.query_pos.tolist(), t.heads.tolist()) if h == 1}
    pooled = {(r, p) for r, p, s in zip(t.rows.tolist(), t.query_pos.tolist(), t.spread.tolist()) if s}
    assert pooled <= heads_1  # ... and head 1 still reads the objects counted
    plain = data_for(model, tok).batch(0, 8).attention_targets
    assert plain.spread is None
    with pytest.raises(ConfigError, match="pool_categories"):
        SyntheticTrainData(data.gen, tok, model.default_chat_template(), ModelLayoutInfo.of(model), PRE,
                           attention_grid=GRID, pool_categories=("counting",))


def test_spread_loss_is_zero_for_an_even_spread_and_grows_as_it_peaks():
    from types import SimpleNamespace

    from vlmexport.training.batching import AttentionTargets
    from vlmexport.training.objectives import attention_loss

    keys = torch.tensor([[True, True, True, True, False], [True, True, False, False, False]])
    targets = AttentionTargets(torch.tensor([0, 0]), torch.tensor([3, 3]), torch.tensor([0, 1]), keys,
                               torch.tensor([True, False]))

    def loss(scores):
        probe = SimpleNamespace(log_probs=lambda t, is_image: (torch.log_softmax(scores, -1), t.keys))
        return float(attention_loss(probe, targets, torch.ones(1, 5, dtype=torch.bool)))

    even = torch.tensor([[0.0, 0.0, 0.0, 0.0, -50.0], [0.0, 0.0, -50.0, -50.0, -50.0]])
    assert loss(even) == pytest.approx(0.0, abs=1e-6)  # the spread row: KL 0; the mass row: all on its keys
    peaked = even.clone()
    peaked[0, 0] = 3.0  # row 0 still puts all its mass on its keys, but unevenly
    assert loss(peaked) > 0.1
    assert loss(torch.tensor([[0.0] * 5, [0.0, 0.0, -50.0, -50.0, -50.0]])) > 0.1  # mass off the keys counts too
