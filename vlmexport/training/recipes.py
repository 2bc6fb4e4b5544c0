"""Recipes: a model shape, a tokenizer, data and an ordered list of stages.

``demo`` trains the shipped demo model from scratch on the synthetic data. A recipe is
plain data (JSON-serialisable), so ``vlmexport train --recipe FILE.json`` runs a user's
own variant and the run directory records exactly what was run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..core.atomic import atomic_file
from ..core.errors import ConfigError
from ..core.preprocess import PreprocessConfig
from ..core.prompt import ChatTemplate
from ..core.tokenizer import Tokenizer, train_tokenizer
from ..data import SyntheticVQA
from ..evaluation import EvalReport, evaluate
from ..models import get_architecture, seeded_init
from ..models.base import VisionConfig
from ..models.checkpoint import load_pretrained, save_pretrained
from ..runtimes.torch_backend import pipeline_from_model
from .batching import ModelLayoutInfo
from .datasets import SyntheticTrainData
from .stages import Stage
from .trainer import Callbacks, TrainConfig, train
from .vision_pretrain import SyntheticPatchData
from ..data.labels import label_sets

log = logging.getLogger(__name__)


@dataclass
class StageSpec:
    stage: str = Stage.SCRATCH.value
    train: TrainConfig = field(default_factory=TrainConfig)
    turns: tuple[int, int] = (1, 4)
    train_language: bool = False
    train_vision: bool = False
    category_weights: dict[str, float] = field(default_factory=dict)
    max_minutes: float | None = None  # stop early (and save) when the stage runs this long
    dense_weight: float = 0.0  # weight of the dense per-patch auxiliary loss (synthetic data only)
    # weight of the question-conditioned attention loss (synthetic data, cogvlm): the last decoder layer's
    # heads 0/1 read the patches of the objects the question names, at the position that predicts the answer
    attention_weight: float = 0.0
    attention_categories: tuple[str, ...] = ()  # the question categories it supervises (empty: all)
    # categories whose head 0 spreads evenly over every patch instead (["count"], with the recipe's
    # patch_centres: the mean of "a circle is centred here" over the patches counts the circles)
    pool_categories: tuple[str, ...] = ()
    # weight of the same loss on the first decoder layer: at the position that predicts the answer, heads 0/1
    # read the question words that name what the answer depends on ("red", "circle"; data.labels.question_referents)
    word_attention_weight: float = 0.0
    two_image_fraction: float = 0.0  # share of two-image sequences (an in-context example, then the questions)
    # how often each image kind is drawn relative to the generator's mix ({"text": 2.0}: twice the text images)
    kind_weights: dict[str, float] = field(default_factory=dict)


@dataclass
class Recipe:
    name: str
    arch: str = "cogvlm"
    model: dict[str, Any] = field(default_factory=dict)  # config overrides (vision_config as a dict)
    image_size: int = 96
    tokenizer_vocab: int = 1024
    tokenizer_corpus: int = 20000  # synthetic samples whose text trains the tokenizer
    # also train it on each sample's questions as the chat template writes them ("Question: ... Answer: ..."),
    # so the template's own words are pieces rather than byte fallbacks (12 fewer tokens per turn in the demo)
    tokenizer_template_text: bool = False
    # the dense per-patch labels also give each patch's row and column (data.labels.label_sets)
    patch_coordinates: bool = False
    # ... and which shape's centre each patch holds, one patch per object (what a count question reads;
    # data.labels.patch_labels)
    patch_centres: bool = False
    # the chat template the model trains with and ships: "" the architecture's default (cogvlm: THUDM's, which
    # ends only the LAST answer of a conversation with EOS), "legacy" vlmexport's own (EOS after every answer),
    # or a .jinja file
    chat_template: str = ""
    data_seed: int = 0
    seed: int = 0
    stages: list[StageSpec] = field(default_factory=list)
    eval_every: int = 0
    eval_n_per_category: int = 40  # during training (learning curve); the final eval uses more
    final_eval_n_per_category: int = 200
    save_dtype: str = "float16"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        d = dict(d)
        stages = []
        for s in d.pop("stages", []):
            s = dict(s)
            t = s.get("train", {})
            s["train"] = TrainConfig(**{**t, "betas": tuple(t.get("betas", (0.9, 0.95))),
                                        "train_roles": tuple(t.get("train_roles", ()))})
            s["turns"] = tuple(s.get("turns", (1, 4)))
            s["attention_categories"] = tuple(s.get("attention_categories", ()))
            s["pool_categories"] = tuple(s.get("pool_categories", ()))
            stages.append(StageSpec(**s))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"recipe has unknown keys {sorted(unknown)}; known keys are {sorted(known)}")
        return cls(stages=stages, **d)

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        try:
            d = json.loads(Path(path).read_text())
            template = d.get("chat_template", "") if isinstance(d, dict) else ""
            if isinstance(template, str) and template.endswith(".jinja") and not Path(template).is_absolute():
                d["chat_template"] = str(Path(path).parent / template)  # a relative .jinja names a file beside the recipe
            return cls.from_dict(d)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such recipe file; use --recipe demo or a JSON recipe") from None
        except (json.JSONDecodeError, TypeError) as exc:
            raise ConfigError(f"{path}: not a valid recipe ({exc}); compare with `vlmexport train --show-recipe demo`") from None


def demo_recipe() -> Recipe:
    """The shipped demo model: a ~7M-parameter cogvlm (about 14 MB in fp16), 96 px images.

    Two stages, measured on the 2-core CPU machine (README, "The demo model"):

    1. ``vision``: the ViT alone on dense per-patch labels (colour, shape, character
       under each patch, the patch's row and column, and which shape's centre it holds,
       one patch per object: ``patch_centres``): a from-scratch ViT learns nothing
       useful through the decoder's sparse answer loss in the first minutes, with this it does.
    2. ``scratch``: everything jointly on multi-turn VQA, the dense loss kept at half
       weight (on the ViT's features and on the last decoder layer's image inputs); the ViT
       at 0.3x the decoder's learning rate (at 1x it diverges). Two attention losses
       (docs/training.md, "Auxiliary losses"): at the position that predicts an answer, the
       first layer's heads 0/1 read the question words that name what the answer depends on
       and the last layer's heads 0/1 read those objects' patches (for a reading answer, the
       characters each answer token spells); for a count question head 0 instead spreads
       evenly over every patch (``pool_categories``: the mean of the centre features is a
       count, the mean over the counted objects is not). Text images twice as often as the
       generator's mix draws them (one question each, against up to ten about a scene) and
       count questions twice as often among a scene's. Measured: 95.3% on the test split
       (README). The schedule is defined by steps; the stages' budgets (8 and 50 minutes)
       only stop a slower machine (the 2-vCPU EPYC VM ran all 2,600 joint steps in
       47.9 min).

    It trains with vlmexport's own chat template (``chat_template="legacy"``: EOS after every
    answer) rather than cogvlm's default, THUDM's, which closes only a conversation's last
    answer: with up to ten answers per sequence the model then rarely learns to stop (47 of
    the 200 test count answers of the previous demo model ran on past their digit, "1" ->
    "11"; none of this one's do).

    The tokenizer also learns the chat template's words (12 fewer tokens per turn). Patch 12
    (64 image tokens) rather than 8 (144) buys ~2x the steps per minute; a 2-layer decoder
    learns question-to-image retrieval in fewer steps than a 4-layer one (decoder-only
    probe: 79% vs 45% after 400 steps, one seed each) and is faster per step. Up to 10
    questions per image: the ViT's cost is paid once per image. The ViT's position table
    starts as 2-D sin-cos (``CogVLM.reset_special_parameters``). The FFN width is a multiple
    of 256 so that llama.cpp's k-quants apply to ``ffn_down`` (rows of another width stay
    f16 in a q4_k_m file).
    """
    return Recipe(
        name="demo",
        model=dict(
            vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=320,
            vision_config=dict(image_size=96, patch_size=12, hidden_size=192, intermediate_size=768,
                               num_hidden_layers=6, num_heads=6),
        ),
        image_size=96,
        tokenizer_template_text=True,
        patch_coordinates=True,
        patch_centres=True,
        chat_template="legacy",
        stages=[
            StageSpec(
                stage="vision",
                train=TrainConfig(steps=800, batch_size=64, lr=2e-3, min_lr_ratio=0.5, warmup_steps=30,
                                  weight_decay=0.05, save_every=100, log_every=10),
                turns=(1, 1),
                max_minutes=8,
            ),
            StageSpec(
                stage="scratch",
                train=TrainConfig(steps=2600, batch_size=32, lr=5e-4, min_lr_ratio=0.1, warmup_steps=50,
                                  weight_decay=0.05, save_every=100, log_every=10,
                                  lr_multipliers={"vision": 0.3, "connector": 1.0}),
                turns=(4, 10),
                max_minutes=50,
                dense_weight=0.5,
                attention_weight=1.0,
                word_attention_weight=1.0,
                kind_weights={"text": 2.0},
                category_weights={"count": 2.0},
                pool_categories=("count",),
            ),
        ],
        eval_every=300,
    )


RECIPES: dict[str, Callable[[], Recipe]] = {"demo": demo_recipe}


def get_recipe(name_or_path: str) -> Recipe:
    if name_or_path in RECIPES:
        return RECIPES[name_or_path]()
    if name_or_path.endswith(".json"):
        return Recipe.load(name_or_path)
    raise ConfigError(f"unknown recipe {name_or_path!r}; use one of {sorted(RECIPES)} or a .json recipe file")


# ---------------------------------------------------------------------- running
def build_model(recipe: Recipe):
    arch = get_architecture(recipe.arch)
    overrides = dict(recipe.model)
    if isinstance(overrides.get("vision_config"), dict):
        overrides["vision_config"] = VisionConfig(**overrides["vision_config"])
    config = arch.tiny_config(**overrides)
    if config.vision_config.image_size != recipe.image_size:
        raise ConfigError(f"recipe image_size {recipe.image_size} differs from the model's vision image_size "
                          f"{config.vision_config.image_size}")
    return seeded_init(arch(config), recipe.seed)


def template_corpus(gen: SyntheticVQA, n_samples: int, template) -> list[str]:
    """Each of the first ``n_samples`` train images' questions and answers as one conversation,
    rendered by the chat ``template`` without BOS/EOS (the text a tokenizer should know)."""
    from ..core.prompt import Turn, messages_for, render_text
    from ..data.synthetic import questions

    out = []
    for i in range(int(n_samples)):
        turns = [Turn(qa.question, answer=qa.answer) for qa in questions(gen.spec("train", i))]
        text, _ = render_text(template, messages_for(template, turns), False, {"bos_token": "", "eos_token": ""})
        out.append(text)
    return out


def recipe_template(recipe: Recipe, model) -> ChatTemplate:
    """The chat template a recipe trains with (``Recipe.chat_template``); the model ships it."""
    name = recipe.chat_template
    family = model.default_chat_template(model.config)
    if not name:
        return family
    if name == "legacy":
        jinja, source = ChatTemplate.legacy().jinja, "vlmexport:legacy"
    else:
        path = Path(name)
        if path.suffix != ".jinja" or not path.is_file():
            raise ConfigError(f"recipe chat_template {name!r} is neither \"\", \"legacy\" nor an existing .jinja file")
        jinja, source = path.read_text(), path.name
    # the family's image token and tokenization, as models.checkpoint.read_chat_template reads the
    # shipped chat_template.jinja back: the model is prompted the way it was trained
    return ChatTemplate(jinja=jinja, image_token=family.image_token, encode_runs_apart=family.encode_runs_apart,
                        source=source)


def ensure_tokenizer(recipe: Recipe, out: Path, gen: SyntheticVQA, template=None) -> Tokenizer:
    path = out / "tokenizer.model"
    if not path.is_file():
        lines = gen.corpus(recipe.tokenizer_corpus)
        if recipe.tokenizer_template_text:
            if template is None:
                template = recipe_template(recipe, build_model(recipe))
            lines += template_corpus(gen, recipe.tokenizer_corpus, template)
        with atomic_file(path) as tmp:
            train_tokenizer(lines, tmp, vocab_size=recipe.tokenizer_vocab)
    return Tokenizer(path)


def synthetic_eval(model, tokenizer, preprocess, gen: SyntheticVQA, n_per_category: int,
                   split: str = "test") -> EvalReport:
    pipe = pipeline_from_model(model, tokenizer, preprocess)
    return evaluate(pipe, gen.eval_items(split, n_per_category), meta={"split": split})


def run_dir_recipe(recipe: Recipe, out: Path) -> Recipe:
    """The recipe as a run directory keeps it (``recipe.json``): a ``.jinja`` chat template is copied
    beside it under its own file name and named relatively, so the directory resumes from anywhere
    (``Recipe.load`` reads a relative .jinja beside the recipe file) and can move to another machine.
    The template must exist (``recipe_template`` checks it first)."""
    if not recipe.chat_template.endswith(".jinja"):
        return recipe
    src = Path(recipe.chat_template)
    dst = out / src.name
    if src.resolve() != dst.resolve():
        with atomic_file(dst) as tmp:
            Path(tmp).write_text(src.read_text())
    return dataclasses.replace(recipe, chat_template=dst.name)


def run_recipe(recipe: Recipe, out_dir: str | Path, device: str = "cpu", callbacks: Callbacks | None = None,
               on_stage: Callable[[int, StageSpec], None] | None = None) -> Path:
    """Run every stage (resuming where a previous run stopped); write ``out_dir/model``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = SyntheticVQA(image_size=recipe.image_size, seed=recipe.data_seed)
    model = build_model(recipe)
    template = recipe_template(recipe, model)
    (out / "recipe.json").write_text(run_dir_recipe(recipe, out).to_json() + "\n")
    tok = ensure_tokenizer(recipe, out, gen, template)
    if tok.vocab_size > model.config.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} pieces but the recipe's vocab_size is "
                          f"{model.config.vocab_size}")
    pre = PreprocessConfig(image_size=recipe.image_size)
    info = ModelLayoutInfo.of(model)
    timings = []
    heads: dict | None = None
    grid = recipe.image_size // model.config.vision_config.patch_size
    sets = label_sets(grid, recipe.patch_coordinates, recipe.patch_centres)
    for k, spec in enumerate(recipe.stages):
        if on_stage:
            on_stage(k, spec)
        run_dir = out / f"stage{k + 1}-{spec.stage}"
        done = run_dir / "DONE"
        if done.is_file():  # finished earlier: load its weights and go on
            model.load_state_dict(_load_weights(run_dir), strict=False)
            heads = _load_heads(run_dir)
            continue
        if spec.stage == Stage.VISION.value:
            data = SyntheticPatchData(gen, pre, model.config.vision_config.patch_size, index_offset=k * 10_000_000,
                                      coordinates=recipe.patch_coordinates, centres=recipe.patch_centres)
        else:
            data = SyntheticTrainData(gen, tok, template, info, pre, turns=spec.turns, seed=recipe.seed + k,
                                      category_weights=spec.category_weights, index_offset=k * 10_000_000,
                                      patch_grid=grid if spec.dense_weight > 0 else None,
                                      two_image_fraction=spec.two_image_fraction,
                                      attention_grid=grid if spec.attention_weight > 0 else None,
                                      attention_categories=spec.attention_categories,
                                      coordinates=recipe.patch_coordinates,
                                      word_targets=spec.word_attention_weight > 0,
                                      kind_weights=spec.kind_weights, centres=recipe.patch_centres,
                                      pool_categories=spec.pool_categories)
        val_n = recipe.eval_n_per_category

        def eval_fn(m, _n=val_n):
            r = synthetic_eval(m, tok, pre, gen, _n, split="val")
            return {"overall": r.overall, **{c: v["accuracy"] for c, v in r.per_category.items()}}

        t0 = time.perf_counter()
        result = train(model, data, spec.train, run_dir, stage=spec.stage, train_language=spec.train_language,
                       train_vision=spec.train_vision, device=device, callbacks=callbacks,
                       eval_fn=eval_fn if recipe.eval_every and spec.stage != Stage.VISION.value else None,
                       eval_every=recipe.eval_every,
                       stop_after_s=spec.max_minutes * 60 if spec.max_minutes else None,
                       dense_weight=spec.dense_weight, objective_init=heads,
                       attention_weight=spec.attention_weight, label_sets=sets,
                       word_attention_weight=spec.word_attention_weight)
        timings.append({"stage": spec.stage, "steps": result.steps_done, "seconds": time.perf_counter() - t0})
        heads = _load_heads(run_dir)
        if result.reason != "interrupted":
            done.write_text(json.dumps({"steps": result.steps_done, "loss": result.final_loss}) + "\n")
        else:
            raise KeyboardInterrupt  # stopped by a signal: the checkpoint is saved, rerun to resume
    model_dir = out / "model"
    dtype = getattr(torch, recipe.save_dtype)
    save_pretrained(model, model_dir, tok, pre, dtype=dtype, metadata={"recipe": recipe.name}, template=template)
    (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    (out / "learning_curve.json").write_text(json.dumps(learning_curve(out, recipe), indent=2) + "\n")
    return model_dir


def learning_curve(out: Path, recipe: Recipe) -> list[dict]:
    """Every validation evaluation of a recipe run, in order: stage, step, minutes into the
    stage and exact match per category (from each stage's trainer_state.json)."""
    rows = []
    for k, spec in enumerate(recipe.stages):
        state = out / f"stage{k + 1}-{spec.stage}" / "checkpoint" / "trainer_state.json"
        if not state.is_file():
            continue
        for h in json.loads(state.read_text()).get("history", []):
            if "eval" in h:
                rows.append({"stage": spec.stage, "step": h["step"], "minutes": round(h["elapsed_s"] / 60, 2),
                             **{c: round(v, 4) for c, v in h["eval"].items()}})
    return rows


def _load_heads(run_dir: Path) -> dict[str, torch.Tensor] | None:
    """Training-only heads of a finished stage (carried into the next stage)."""
    from safetensors.torch import load_file

    path = run_dir / "checkpoint" / "objective.safetensors"
    heads = load_file(str(path)) if path.is_file() else {}
    heads.pop("__none__", None)
    return heads or None


def _load_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoint" / "model.safetensors"))


def evaluate_model_dir(model_dir: str | Path, image_size: int | None = None, n_per_category: int = 200,
                       split: str = "test", seed: int = 0) -> EvalReport:
    loaded = load_pretrained(model_dir)
    gen = SyntheticVQA(image_size=image_size or loaded.preprocess.image_size, seed=seed)
    return synthetic_eval(loaded.model.float(), loaded.tokenizer, loaded.preprocess, gen, n_per_category, split)
