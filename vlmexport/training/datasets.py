"""Training data sources addressed by a global example index (see ``trainer.TrainData``).

Example ``i`` is a pure function of ``i`` (and the seed), so the trainer can ask for any
micro-batch of any step, on any rank, and a resumed run sees the same data.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..core.errors import DataError
from ..core.preprocess import PreprocessConfig
from ..core.prompt import ChatTemplate
from ..data import CATEGORIES, SyntheticVQA, read_llava_jsonl
from ..data.jsonl import ConversationRecord
from ..data.synthetic import questions
from ..core.errors import ConfigError
from .batching import IGNORE, AttentionTargets, Batch, Example, ModelLayoutInfo, answer_query_positions, build_example, collate


TWO_IMAGE_OFFSET = 5_000_000  # train indices of the first images of two-image sequences
_KIND_TRIES = 16


def _check_kind_weights(weights: dict[str, float] | None) -> dict[str, float]:
    from ..data.synthetic import KIND_MIX

    weights = {k: float(v) for k, v in (weights or {}).items()}
    kinds = [k for k, _ in KIND_MIX]
    unknown = set(weights) - set(kinds)
    if unknown:
        raise ConfigError(f"kind_weights names unknown image kinds {sorted(unknown)}; use {', '.join(kinds)}")
    if any(v < 0 for v in weights.values()) or (weights and max(weights.values()) <= 0):
        raise ConfigError("kind_weights must be >= 0 with at least one above 0")
    return {k: weights.get(k, 1.0) for k in kinds} if weights else {}


class SyntheticTrainData:
    """Fresh synthetic images from the train split; several questions about one image are
    packed into one multi-turn sequence, so each image encode supervises several answers."""

    def __init__(self, gen: SyntheticVQA, tokenizer, template: ChatTemplate, info: ModelLayoutInfo,
                 preprocess: PreprocessConfig, turns: tuple[int, int] = (1, 4), seed: int = 0,
                 category_weights: dict[str, float] | None = None, index_offset: int = 0,
                 patch_grid: int | None = None, two_image_fraction: float = 0.0, attention_grid: int | None = None,
                 attention_categories: Sequence[str] = (), coordinates: bool = False, word_targets: bool = False,
                 kind_weights: dict[str, float] | None = None, centres: bool = False,
                 pool_categories: Sequence[str] = ()):
        self.gen, self.tokenizer, self.template, self.info = gen, tokenizer, template, info
        self.preprocess = preprocess
        self.patch_grid = patch_grid  # also return per-patch labels (dense auxiliary loss)
        self.coordinates = coordinates  # ... with each patch's row and column among them
        self.centres = centres  # ... and which object's centre it holds
        self.word_targets = word_targets  # also where each question names its referents (first decoder layer)
        self.turns = turns
        self.seed = seed
        self.weights = {c: 1.0 for c in CATEGORIES} | dict(category_weights or {})
        self.index_offset = index_offset  # lets a later stage draw images the earlier one never saw
        # how often each image kind (scene, count, text, chart) is drawn, relative to the generator's own mix
        # (KIND_MIX): a text image carries one question and a scene up to ten, so reading gets little signal
        self.kind_weights = _check_kind_weights(kind_weights)
        # share of two-image sequences: another image and one of its questions answered first (an
        # in-context example), then this image's questions (MMICL / Flamingo-style interleaving)
        self.two_image_fraction = float(two_image_fraction)
        if self.two_image_fraction and (patch_grid or attention_grid):
            raise ConfigError("two-image sequences and the dense per-patch or attention losses cannot be combined "
                              "in one stage; set dense_weight and attention_weight 0, or two_image_fraction 0")
        # also return where each answer is in the image (question-conditioned attention loss)
        self.attention_grid = attention_grid
        self.attention_categories = frozenset(attention_categories or CATEGORIES)  # the questions it applies to
        # ... whose head 0 instead spreads over every patch (a count: see attention_targets)
        self.pool_categories = frozenset(pool_categories)
        unknown = (self.attention_categories | self.pool_categories) - set(CATEGORIES)
        if unknown:
            raise ConfigError(f"attention_categories / pool_categories {sorted(unknown)} are not categories; use some of "
                              f"{', '.join(CATEGORIES)}")
        if self.pool_categories and not attention_grid:
            raise ConfigError("pool_categories shapes the attention loss: set attention_weight > 0, or drop pool_categories")
        idle = self.pool_categories - (self.attention_categories - {"reading"})
        if idle:
            raise ConfigError(f"pool_categories {sorted(idle)} get no pooled target: use categories the attention "
                              f"loss supervises (attention_categories; reading has its own targets)")

    def turns_for(self, index: int, sample) -> list[tuple[str, str]]:
        rng = np.random.default_rng([self.seed, 0x7A11, index])
        qas = list(sample.qas)
        w = np.array([self.weights.get(q.category, 1.0) for q in qas], dtype=np.float64)
        if w.sum() <= 0:
            w = np.ones(len(qas))
        k = int(rng.integers(self.turns[0], self.turns[1] + 1))
        k = min(k, int(np.count_nonzero(w)))
        order = rng.choice(len(qas), size=k, replace=False, p=w / w.sum())
        return [(qas[i].question, qas[i].answer) for i in order]

    def example(self, index: int) -> Example:
        return self._example(index)[0]

    def _example(self, index: int) -> tuple[Example, list[tuple[str, str]]]:
        sample = self.gen.sample("train", self.image_index(index))
        turns = self.turns_for(index, sample)
        if np.random.default_rng([self.seed, 0x2146, index]).random() < self.two_image_fraction:
            first = self.gen.sample("train", self.index_offset + TWO_IMAGE_OFFSET + index)
            context = self.turns_for(TWO_IMAGE_OFFSET + index, first)[:1]
            return build_example([first.image, sample.image], context + turns, self.tokenizer, self.template,
                                 self.info, images_per_turn=[1, 1] + [0] * (len(turns) - 1)), context + turns
        return build_example([sample.image], turns, self.tokenizer, self.template, self.info), turns

    def image_index(self, index: int) -> int:
        """The train-split image that example ``index`` asks about. With ``kind_weights``: the
        first of up to 16 candidates (a stride of 16 images per example) that a seeded draw
        accepts with probability weight / max weight, so kinds come in the weighted mix."""
        if not self.kind_weights:
            return self.index_offset + index
        top = max(self.kind_weights.values())
        rng = np.random.default_rng([self.seed, 0x41D5, index])
        for k in range(_KIND_TRIES):
            i = self.index_offset + index * _KIND_TRIES + k
            w = self.kind_weights.get(self.gen.spec("train", i)["kind"], 1.0)
            if rng.random() * top < w:
                return i
        return i

    def examples(self, first: int, n: int) -> Sequence[Example]:
        return [self.example(i) for i in range(first, first + n)]

    def batch(self, first: int, n: int) -> Batch:
        built = [self._example(i) for i in range(first, first + n)]
        batch = collate([e for e, _ in built], self.preprocess, self.info.pad_id)
        if self.word_targets:
            batch.word_targets = word_targets(built, self.tokenizer, batch.input_ids.shape[1])
        if self.attention_grid or self.patch_grid:  # the images' specs, drawn once for both
            specs = [self.gen.spec("train", self.image_index(i)) for i in range(first, first + n)]
        if self.attention_grid:
            category = [{qa.question: qa.category for qa in questions(spec)} for spec in specs]
            built = [(ex, [t if c.get(t[0]) in self.attention_categories else None for t in turns])
                     for (ex, turns), c in zip(built, category)]
            pooled = [{q for q, cat in c.items() if cat in self.pool_categories} for c in category]
            batch.attention_targets = attention_targets(built, specs, self.attention_grid, batch.input_ids.shape[1],
                                                        self.tokenizer, pooled)
        if self.patch_grid:
            from ..data.labels import stacked_patch_labels

            batch.patch_labels = stacked_patch_labels(specs, self.patch_grid, self.coordinates, self.centres)
        return batch


def attention_targets(built: Sequence[tuple[Example, list[tuple[str, str]]]], specs: Sequence[dict], grid: int,
                      length: int, tokenizer=None, pooled: Sequence[set[str]] | None = None) -> AttentionTargets:
    """For every answer whose question names objects in the image: head 0 should read the
    first-named object's patches and head 1 the second-named one's (the same object when
    only one is named), at the position that predicts the answer. A reading answer (given a
    ``tokenizer``) has a target at every position that predicts one of its tokens: both heads
    read the characters that token spells (``data.labels.reading_regions``). A turn given as
    None has no target (its category is not supervised). A question in the row's ``pooled``
    set has head 0 spread evenly over every patch instead: the mean of per-patch "an object
    of shape s is centred here" features is (objects of shape s) / patches, a count, where
    the mean over the objects themselves is the same for two as for five."""
    from ..data.labels import question_regions, reading_regions

    out = _TargetRows(length)

    for row, ((ex, turns), spec) in enumerate(zip(built, specs)):
        image_pos = np.flatnonzero(ex.is_image)
        if len(image_pos) != grid * grid + 2:  # boi, the patches, eoi of exactly one image
            continue
        patches = image_pos[1:-1]
        for turn, pos in zip(turns, answer_query_positions(ex.targets)):
            if turn is None:
                continue
            if spec["kind"] == "text" and tokenizer is not None:
                run = [pos]
                while run[-1] + 1 < len(ex.targets) and ex.targets[run[-1] + 1] != IGNORE:
                    run.append(run[-1] + 1)
                ids = [int(ex.targets[p]) for p in run]
                pieces = ["" if i == tokenizer.eos_id else tokenizer.id_to_piece(i) for i in ids]
                for p, region in zip(run, reading_regions(spec, pieces, grid)):
                    if region is not None:
                        out.add(row, p, [patches[region]])
                continue
            regions = question_regions(spec, turn[0], grid)
            if regions and pooled is not None and turn[0] in pooled[row]:
                out.add(row, pos, [patches, patches[regions[0]]], spread=(True, False))
            elif regions:
                out.add(row, pos, [patches[r] for r in regions])
    return out.targets()


def word_targets(built: Sequence[tuple[Example, list[tuple[str, str]]]], tokenizer, length: int) -> AttentionTargets:
    """At the position that predicts each answer: head 0 should read the question tokens that
    name the first referent ("red", "circle"), head 1 the second's (the first's again when
    there is one; ``data.labels.question_referents``). Keys are the question's own tokens, found
    by their pieces between the previous answer and this one."""
    from ..data.labels import question_referents

    out = _TargetRows(length)
    for row, (ex, turns) in enumerate(built):
        start = int(np.flatnonzero(ex.is_image)[-1]) + 1 if ex.is_image.any() else 0
        sup = ex.targets != IGNORE
        for turn, pos in zip(turns, answer_query_positions(ex.targets)):
            if turn is not None:
                begin = max(start, int(np.flatnonzero(sup[:pos])[-1]) + 1 if sup[:pos].any() else start)
                text, ends = "", []
                for i in ex.input_ids[begin:pos + 1]:
                    text += tokenizer.id_to_piece(int(i)).replace("\u2581", " ")
                    ends.append(len(text))
                found, at = [], 0
                for words in question_referents(turn[0]):
                    hit = []
                    for w in words:  # the tokens that spell the word, a whole word after the previous one
                        m = re.compile(rf"(?<![A-Za-z]){re.escape(w)}(?![A-Za-z])").search(text, at)
                        if m:
                            hit += [begin + j for j, end in enumerate(ends)
                                    if end > m.start() and end - _piece_len(ends, j) < m.end()]
                            at = m.end()
                    if hit:
                        found.append(hit)
                if found:
                    out.add(row, pos, found)
    return out.targets()


def _piece_len(ends: list[int], j: int) -> int:
    return ends[j] - (ends[j - 1] if j else 0)


class _TargetRows:
    """Attention targets as they are found: per (row, query position), head 0 reads the first
    set of key positions and head 1 the second (the first again when there is one)."""

    def __init__(self, length: int):
        self.length = length
        self.rows, self.qpos, self.heads, self.keys, self.spread = [], [], [], [], []

    def add(self, row: int, pos: int, key_sets: list, spread: tuple[bool, bool] = (False, False)) -> None:
        for head, where in enumerate((key_sets + key_sets)[:2]):
            mask = np.zeros(self.length, dtype=bool)
            mask[where] = True
            self.rows.append(row), self.qpos.append(pos), self.heads.append(head), self.keys.append(mask)
            self.spread.append(spread[head])

    def targets(self) -> AttentionTargets:
        if not self.rows:
            return AttentionTargets(*(torch.zeros(0, dtype=torch.long) for _ in range(3)),
                                    torch.zeros(0, self.length, dtype=torch.bool))
        return AttentionTargets(torch.tensor(self.rows), torch.tensor(self.qpos), torch.tensor(self.heads),
                                torch.from_numpy(np.stack(self.keys)),
                                torch.tensor(self.spread) if any(self.spread) else None)


class JsonlTrainData:
    """LLaVA-style JSONL conversations, reshuffled every epoch (deterministically)."""

    def __init__(self, path: str | Path, tokenizer, template: ChatTemplate, info: ModelLayoutInfo,
                 preprocess: PreprocessConfig, seed: int = 0, image_root: str | Path | None = None,
                 cache_images: int = 4096):
        self.records: list[ConversationRecord] = list(read_llava_jsonl(path, image_root=image_root))
        if not self.records:
            raise DataError(f"{path}: no conversations; add lines with an image and a conversations list")
        self.image_size = preprocess.image_size
        self.tokenizer, self.template, self.info, self.preprocess = tokenizer, template, info, preprocess
        self.seed = seed
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_size = cache_images
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.records)

    def _image(self, k: int) -> np.ndarray:
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        img = self.records[k].load_image(self.image_size)
        self._cache[k] = img
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return img

    def example(self, index: int) -> Example:
        n = len(self.records)
        epoch, pos = divmod(index, n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(n))
        k = int(self._perm[1][pos])
        rec = self.records[k]
        return build_example([self._image(k)], list(rec.turns), self.tokenizer, self.template, self.info)

    def examples(self, first: int, n: int) -> Sequence[Example]:
        return [self.example(i) for i in range(first, first + n)]

    def batch(self, first: int, n: int) -> Batch:
        return collate(self.examples(first, n), self.preprocess, self.info.pad_id)
