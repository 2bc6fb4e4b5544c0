"""Training stages, the loop, exact resume and interruption on tiny models."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from vlmexport.core.errors import CheckpointError, ConfigError
from vlmexport.core.preprocess import PreprocessConfig
from vlmexport.core.prompt import ChatTemplate
from vlmexport.core.tokenizer import Tokenizer
from vlmexport.models import get_architecture, seeded_init
from vlmexport.training.batching import ModelLayoutInfo, build_example
from vlmexport.data import SyntheticVQA, write_llava_jsonl
from vlmexport.training.datasets import JsonlTrainData, SyntheticTrainData
from vlmexport.training.memory import estimate_memory
from vlmexport.training.stages import apply_stage
from vlmexport.training.trainer import Callbacks, TrainConfig, train

PRE = PreprocessConfig(image_size=32)


def tiny(arch: str = "cogvlm", seed: int = 0):
    A = get_architecture(arch)
    return seeded_init(A(A.tiny_config(max_position_embeddings=512)), seed)


def data_for(model, tok, seed=0, turns=(1, 3)):
    gen = SyntheticVQA(image_size=32, seed=0)
    return SyntheticTrainData(gen, tok, model.default_chat_template(), ModelLayoutInfo.of(model), PRE, turns=turns,
                              seed=seed)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def cfg(**kw):
    base = dict(steps=4, batch_size=4, lr=3e-3, warmup_steps=1, save_every=100, log_every=1, precision="fp32")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def tok(tokenizer_path):
    return Tokenizer(tokenizer_path)


def test_examples_supervise_answers_only(tok):
    model = tiny()
    ex = build_example([SyntheticVQA(32).sample("train", 0).image], [("What colour is the star?", "red")], tok,
                       model.default_chat_template(), ModelLayoutInfo.of(model))
    supervised = ex.targets[ex.targets != -100].tolist()
    assert supervised == tok.encode("red") + [tok.eos_id]
    assert ex.is_image.sum() == model.image_tokens()
    assert ex.input_ids[0] == tok.bos_id and ex.is_image[1]  # image right after BOS


def test_align_stage_trains_only_the_connector(tmp_path, tok):
    model = tiny()
    before = snapshot(model)
    train(model, data_for(model, tok), cfg(), tmp_path / "run", stage="align")
    roles = {n: model.parameter_role(n) for n in before}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "nothing trained"
    assert {roles[n] for n in changed} == {"connector"}
    for n, p in model.named_parameters():  # frozen parameters are bit-identical
        if roles[n] != "connector":
            assert torch.equal(p, before[n]), n
    assert "model.vision.boi" in changed and "model.vision.eoi" in changed


def test_fuse_stage_copies_language_weights_into_visual_experts(tok):
    model = tiny()
    apply_stage(model, "fuse")
    pairs = list(model.iter_visual_expert_pairs())
    assert pairs
    for lang, vis in pairs:
        for (_, a), (_, b) in zip(lang.named_parameters(), vis.named_parameters()):
            assert torch.equal(a, b)


def test_fuse_stage_trains_experts_and_connector_only(tmp_path, tok):
    model = tiny()
    apply_stage(model, "fuse")  # copy first so "before" holds the initialised experts
    before = snapshot(model)
    train(model, data_for(model, tok), cfg(), tmp_path / "run", stage="fuse", )
    roles = {n: model.parameter_role(n) for n in before}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {roles[n] for n in changed} == {"connector", "visual_expert"}
    frozen = [n for n in before if roles[n] in ("language", "vision", "embedding")]
    assert frozen and all(torch.equal(dict(model.named_parameters())[n], before[n]) for n in frozen)


def test_fuse_with_train_language(tmp_path, tok):
    model = tiny()
    names = apply_stage(model, "fuse", train_language=True)
    assert any(model.parameter_role(n) == "language" for n in names)
    assert not any(model.parameter_role(n) == "vision" for n in names)


def test_fuse_needs_experts():
    with pytest.raises(ConfigError, match="no visual experts"):
        apply_stage(tiny("llava"), "fuse")


def test_loss_falls(tmp_path, tok):
    model = tiny()
    losses = []
    train(model, data_for(model, tok), cfg(steps=60, batch_size=8, lr=2e-3, warmup_steps=5), tmp_path / "run",
          callbacks=Callbacks(on_step=lambda s: losses.append(s.loss)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)


def _crash_after(step):
    def on_step(s):
        if s.step == step:
            raise RuntimeError("simulated crash")
    return Callbacks(on_step=on_step)


def test_resume_is_exact(tmp_path, tok):
    straight = tiny()
    train(straight, data_for(straight, tok), cfg(steps=8, save_every=4), tmp_path / "a")

    crashed = tiny()
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(crashed, data_for(crashed, tok), cfg(steps=8, save_every=4), tmp_path / "b",
              callbacks=_crash_after(6))
    resumed = tiny(seed=123)  # different initial weights: everything must come from the checkpoint
    steps = []
    res = train(resumed, data_for(resumed, tok), cfg(steps=8, save_every=4), tmp_path / "b",
                callbacks=Callbacks(on_step=lambda s: steps.append(s.step)))
    assert steps == [5, 6, 7, 8]  # restarted after the last checkpoint (step 4)
    assert res.steps_done == 8
    for (n, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n


def test_sigint_finishes_the_step_and_saves(tmp_path, tok):
    model = tiny()

    def on_step(s):
        if s.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    res = train(model, data_for(model, tok), cfg(steps=10, save_every=100), tmp_path / "run",
                callbacks=Callbacks(on_step=on_step))
    assert res.reason == "interrupted" and res.steps_done == 3
    import json

    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 3  # no finished step lost


def test_checkpoint_of_another_stage_is_refused(tmp_path, tok):
    model = tiny()
    train(model, data_for(model, tok), cfg(steps=2), tmp_path / "run", stage="align")
    with pytest.raises(CheckpointError, match="align checkpoint"):
        train(tiny(), data_for(model, tok), cfg(steps=4), tmp_path / "run", stage="fuse")


def test_corrupt_training_checkpoint_is_a_clear_error(tmp_path, tok):
    model = tiny()
    train(model, data_for(model, tok), cfg(steps=2), tmp_path / "run")
    (tmp_path / "run" / "checkpoint" / "optimizer.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable training checkpoint"):
        train(tiny(), data_for(model, tok), cfg(steps=4), tmp_path / "run")


def test_jsonl_data_trains(tmp_path, tok):
    gen = SyntheticVQA(image_size=32, seed=0)
    write_llava_jsonl(gen.samples("train", 6), tmp_path / "ds")
    model = tiny()
    data = JsonlTrainData(tmp_path / "ds" / "data.jsonl", tok, model.default_chat_template(),
                          ModelLayoutInfo.of(model), PRE)
    assert len(data) == 6
    batch = data.batch(0, 4)
    assert batch.pixel_values.shape == (4, 3, 32, 32) and batch.supervised_tokens > 0
    res = train(model, data, cfg(steps=2), tmp_path / "run")
    assert res.steps_done == 2 and math.isfinite(res.final_loss)


def test_lr_schedule_warmup_then_cosine():
    c = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert c.lr_at(0) == pytest.approx(0.1)
    assert c.lr_at(9) == pytest.approx(1.0)
    assert c.lr_at(55) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-6)  # half way through the cosine
    assert c.lr_at(100) == pytest.approx(0.1)


def test_memory_estimate_counts_adamw_state():
    model = tiny()
    apply_stage(model, "align")
    est = estimate_memory(model, micro_batch=2, seq_len=64, mixed_precision=True, grad_checkpointing=False)
    assert est.optimizer == 8 * est.trainable_params and est.gradients == 4 * est.trainable_params
    assert est.trainable_params < est.total_params
    assert "GiB" in est.describe()
    ckpt = estimate_memory(model, 2, 64, True, grad_checkpointing=True)
    assert ckpt.activations < est.activations


def test_gradient_checkpointing_gives_the_same_gradients(tok):
    model = tiny()
    batch = data_for(model, tok).batch(0, 2)
    from vlmexport.training.objectives import loss_on_batch

    model.train()
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        loss, _ = loss_on_batch(model, batch)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6)


def test_demo_recipe_round_trips_through_json():
    import json

    from vlmexport.training.recipes import Recipe, demo_recipe

    r = demo_recipe()
    assert Recipe.from_dict(json.loads(r.to_json())) == r


def test_shipped_recipe_files_load_and_round_trip():
    import json
    from pathlib import Path

    from vlmexport.training.recipes import Recipe

    files = sorted((Path(__file__).parents[2] / "docs" / "recipes").glob("*.json"))
    assert files
    for f in files:
        r = Recipe.load(f)
        assert Recipe.from_dict(json.loads(r.to_json())) == r, f.name


def test_template_text_makes_the_templates_words_pieces(tmp_path):
    """With ``tokenizer_template_text`` the recipe's tokenizer learns "Question:"/"Answer:"
    from the chat template's own rendering; without it they fall back to bytes."""
    from vlmexport.training.recipes import demo_recipe, ensure_tokenizer

    gen = SyntheticVQA(image_size=96, seed=0)
    lengths = {}
    for flag in (False, True):
        r = demo_recipe()
        r.tokenizer_corpus, r.tokenizer_template_text = 300, flag
        tok = ensure_tokenizer(r, tmp_path / str(flag), gen)
        lengths[flag] = len(tok.encode("Question: What colour is the circle? Answer: red"))
    assert lengths[True] <= lengths[False] - 8



def _answers_closed_by_eos(data, tok, n=12):
    """(answers, answers followed by an EOS target) over the first ``n`` examples."""
    from vlmexport.training.batching import IGNORE, answer_query_positions

    answers = closed = 0
    for i in range(n):
        t = data.example(i).targets
        for pos in answer_query_positions(t):
            answers += 1
            end = pos
            while end + 1 < len(t) and t[end + 1] != IGNORE:
                end += 1
            closed += int(t[end]) == tok.eos_id
    return answers, closed


def test_recipe_chat_template_pins_what_the_model_trains_with(tmp_path, tok):
    """``Recipe.chat_template``: "" is the family's default (cogvlm: THUDM's, EOS only after a
    conversation's last answer), "legacy" closes every answer with EOS, a .jinja file is read;
    anything else is a one-line error."""
    from vlmexport.training.recipes import Recipe, build_model, recipe_template, run_dir_recipe

    r = Recipe(name="t", image_size=get_architecture("cogvlm").tiny_config().vision_config.image_size)
    model = build_model(r)
    size = r.image_size
    gen, info, pre = SyntheticVQA(image_size=size, seed=0), ModelLayoutInfo.of(model), PreprocessConfig(image_size=size)
    counts = {}
    for name in ("", "legacy"):
        r.chat_template = name
        template = recipe_template(r, model)
        counts[name] = _answers_closed_by_eos(SyntheticTrainData(gen, tok, template, info, pre, turns=(4, 6)), tok)
    assert counts[""][1] < counts[""][0]  # multi-turn: only the last answer ends with EOS
    assert counts["legacy"][1] == counts["legacy"][0] > counts[""][1]
    f = tmp_path / "mine.jinja"
    f.write_text(ChatTemplate.legacy().jinja)
    r.chat_template = str(f)
    assert recipe_template(r, model).jinja == f.read_text()
    # in a recipe file, a relative .jinja path names a file beside the recipe, whatever the cwd
    (tmp_path / "r.json").write_text(r.to_json().replace(json.dumps(str(f)), json.dumps("mine.jinja")))
    assert recipe_template(Recipe.load(tmp_path / "r.json"), model).jinja == f.read_text()
    # a run directory keeps its own copy, named relatively: it resumes after a move (and twice in a row)
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.json").write_text(run_dir_recipe(r, run).to_json())
    resumed = Recipe.load(run / "recipe.json")  # a resumed run writes it again over its own copy
    (run / "recipe.json").write_text(run_dir_recipe(resumed, run).to_json())
    assert json.loads((run / "recipe.json").read_text())["chat_template"] == "mine.jinja"
    f.unlink()
    run.rename(tmp_path / "moved")
    assert recipe_template(Recipe.load(tmp_path / "moved/recipe.json"), model).jinja == ChatTemplate.legacy().jinja
    r.chat_template = "llama"
    with pytest.raises(ConfigError, match="chat_template 'llama'"):
        recipe_template(r, model)


def test_kind_weights_change_the_image_mix(tok):
    """``kind_weights`` draws image kinds in the weighted mix (text twice as often here: about
    a third of the images instead of a fifth), deterministically; unknown kinds are an error."""
    from vlmexport.data.synthetic import KIND_MIX

    A = get_architecture("cogvlm")
    model = seeded_init(A(A.tiny_config()), 0)
    gen = SyntheticVQA(image_size=32, seed=0)

    def data(weights):
        return SyntheticTrainData(gen, tok, model.default_chat_template(), ModelLayoutInfo.of(model),
                                  PreprocessConfig(image_size=32), kind_weights=weights)

    plain, text2 = data(None), data({"text": 2.0})
    assert [plain.image_index(i) for i in range(5)] == list(range(5))
    n = 900
    share = {d: sum(gen.spec("train", d.image_index(i))["kind"] == "text" for i in range(n)) / n
             for d in (plain, text2)}
    base = dict(KIND_MIX)["text"]
    want = 2 * base / (1 + base)
    assert abs(share[plain] - base) < 0.05 and abs(share[text2] - want) < 0.05, share
    assert [text2.image_index(i) for i in range(20)] == [data({"text": 2.0}).image_index(i) for i in range(20)]
    with pytest.raises(ConfigError, match="unknown image kinds"):
        data({"photo": 1.0})


def test_prefetched_batches_are_the_batches(tmp_path, tokenizer_path):
    """The prefetcher hands out exactly data.batch(first, n), in order or not."""
    from vlmexport.training.trainer import Prefetcher

    A = get_architecture("cogvlm")
    model = seeded_init(A(A.tiny_config()), 0)
    data = SyntheticTrainData(SyntheticVQA(image_size=32, seed=0), Tokenizer(tokenizer_path),
                              model.default_chat_template(), ModelLayoutInfo.of(model),
                              PreprocessConfig(image_size=32), turns=(1, 3))
    p = Prefetcher(data, 3)
    try:
        for first, nxt in ((0, 3), (3, 6), (9, 12), (12, None)):  # 9: asked out of order
            got, want = p.get(first, nxt), data.batch(first, 3)
            assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.pixel_values, want.pixel_values)
    finally:
        p.close()
