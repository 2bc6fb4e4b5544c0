"""Two-image (interleaved) training sequences and evaluation prompts, for every architecture.

A two-image sequence is an in-context example about one image (its question and answer)
followed by another image and its questions: the images sit in their own turns, the
layout numbers them in order (``media``), and the evaluation asks the same way.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmexport.core.errors import ConfigError, DataError
from vlmexport.data import SyntheticVQA
from vlmexport.evaluation.runner import evaluate
from vlmexport.models import architectures
from vlmexport.runtimes.torch_backend import pipeline_from_model
from vlmexport.training.batching import ModelLayoutInfo, build_example, collate
from vlmexport.training.datasets import SyntheticTrainData

ARCHS = sorted(architectures())


@pytest.fixture(scope="module")
def gen():
    return SyntheticVQA(image_size=32, seed=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_two_image_sequence_puts_each_image_in_its_turn(arch, tiny_model, tokenizer, preprocess_config, gen):
    model = tiny_model(arch)
    info = ModelLayoutInfo.of(model)
    data = SyntheticTrainData(gen, tokenizer, model.default_chat_template(model.config), info, preprocess_config,
                              turns=(2, 2), two_image_fraction=1.0)
    ex = data.example(3)
    assert len(ex.images) == 2
    holds = ex.is_image if model.image_placement == "splice" else ex.input_ids == info.image_pad_id
    assert int(holds.sum()) == 2 * model.image_tokens()
    starts = [i for i in range(len(holds)) if holds[i] and (i == 0 or not holds[i - 1])]
    if len(starts) == 2:  # the template keeps each image in its turn (THUDM's cogvlm puts all after BOS)
        # an answer is supervised between the two images (the in-context example's) and after the second
        supervised = np.nonzero(ex.targets != -100)[0]
        assert supervised.min() < starts[1] < supervised.max()
    if model.image_placement == "cross_attend":
        assert len(starts) == 2
    batch = collate([ex, data.example(4)], preprocess_config, model.config.pad_token_id)
    assert batch.pixel_values.shape[0] == 4
    with torch.no_grad():  # the model reads the batch's four images in order (two per row)
        loss_logits = model(batch.input_ids, batch.position_ids, batch.token_type, batch.is_image,
                            batch.pixel_values)
    assert torch.isfinite(loss_logits).all()
    plain = SyntheticTrainData(gen, tokenizer, model.default_chat_template(model.config), info, preprocess_config)
    assert len(plain.example(3).images) == 1


def test_images_per_turn_must_add_up(tiny_model, tokenizer, preprocess_config, gen):
    model = tiny_model(ARCHS[0])
    info = ModelLayoutInfo.of(model)
    s = gen.sample("train", 0)
    with pytest.raises(DataError, match="images_per_turn"):
        build_example([s.image], [("q", "a"), ("q", "a")], tokenizer, model.default_chat_template(model.config),
                      info, images_per_turn=[1, 1])
    with pytest.raises(ConfigError, match="two-image"):
        SyntheticTrainData(gen, tokenizer, model.default_chat_template(model.config), info, preprocess_config,
                           patch_grid=4, two_image_fraction=0.5)


@pytest.mark.parametrize("arch", ARCHS)
def test_two_image_evaluation_asks_after_an_in_context_example(arch, tiny_model, tokenizer, preprocess_config, gen):
    items = gen.two_image_items("test", 2)
    assert items and all(it.context[0][1] and it.image_id for it in items)
    assert all(not np.array_equal(it.context[0][0], it.image) for it in items)
    pipe = pipeline_from_model(tiny_model(arch, seed=3, jitter=True), tokenizer, preprocess_config)
    seen = []
    original = pipe.session.prefill
    pipe.session.prefill = lambda layout, embeds: (seen.append((layout, embeds)), original(layout, embeds))[1]
    report = evaluate(pipe, items[:3], max_new_tokens=3)
    assert report.meta["items"] == 3
    assert all(len(layout.image_spans) == 2 and embeds.shape[0] == 2 for layout, embeds in seen)
