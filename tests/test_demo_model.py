"""The shipped demo model: present, within its size budget, loadable, and `vlmexport eval`
reproduces the accuracy the README reports (95.3% on 200 test questions per category)."""

import json

import pytest

from vlmexport.assets import demo_model_dir
from vlmexport.training.recipes import demo_recipe

README_OVERALL = 0.953  # README.md, "The demo model"
HELD_OUT_SEED = 20261206


def test_demo_model_is_shipped_and_small():
    d = demo_model_dir()
    total = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
    assert total <= 25 * 1024 * 1024
    config = json.loads((d / "config.json").read_text())
    r = demo_recipe()
    assert config["hidden_size"] == r.model["hidden_size"]
    assert config["num_hidden_layers"] == r.model["num_hidden_layers"]
    assert config["vision_config"]["patch_size"] == r.model["vision_config"]["patch_size"]
    curve = json.loads((d / "learning_curve.json").read_text())
    assert curve and all("overall" in row for row in curve)


def test_the_shipped_recipe_is_the_demo_recipe():
    """`vlmexport train --recipe demo` is what trained the shipped weights (the recipe beside them)."""
    from vlmexport.training.recipes import Recipe

    assert Recipe.load(demo_model_dir() / "recipe.json") == demo_recipe()


@pytest.mark.slow
def test_eval_reproduces_the_readme_number():
    from vlmexport.evaluation.api import evaluate_path

    report = evaluate_path(None, split="test", n_per_category=200)
    # the same weights and questions; a different CPU may round a near-tie differently
    assert report.overall == pytest.approx(README_OVERALL, abs=0.01)
    # the target the demo model was trained to: >= 90% overall, no category below 70%
    assert report.overall >= 0.90
    assert min(c["accuracy"] for c in report.per_category.values()) >= 0.70, report.per_category


@pytest.mark.slow
def test_a_test_split_the_recipe_never_saw_scores_within_two_points():
    """Held out honestly: the test split drawn with another generator seed (the recipe trains,
    validates and tests on seed 0) scores within 2 points of the shipped figure (95.4% against
    95.3%, README)."""
    from vlmexport.evaluation.api import evaluate_path

    assert demo_recipe().data_seed != HELD_OUT_SEED
    report = evaluate_path(None, split="test", n_per_category=200, seed=HELD_OUT_SEED)
    assert report.overall == pytest.approx(README_OVERALL, abs=0.02)
