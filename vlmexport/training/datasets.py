"""Training data sources addressed by a global example index (see ``trainer.TrainData``).

Example ``i`` is a pure function of ``i`` (and the seed), so the trainer can ask for any
micro-batch of any step, on any rank, and a resumed run sees the same data.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.errors import DataError
from ..core.preprocess import PreprocessConfig
from ..core.prompt import ChatTemplate
from ..data import CATEGORIES, SyntheticVQA, read_llava_jsonl
from ..data.jsonl import ConversationRecord
from ..core.errors import ConfigError
from .batching import Batch, Example, ModelLayoutInfo, build_example, collate


TWO_IMAGE_OFFSET = 5_000_000  # train indices of the first images of two-image sequences


class SyntheticTrainData:
    """Fresh synthetic images from the train split; several questions about one image are
    packed into one multi-turn sequence, so each image encode supervises several answers."""

    def __init__(self, gen: SyntheticVQA, tokenizer, template: ChatTemplate, info: ModelLayoutInfo,
                 preprocess: PreprocessConfig, turns: tuple[int, int] = (1, 4), seed: int = 0,
                 category_weights: dict[str, float] | None = None, index_offset: int = 0,
                 patch_grid: int | None = None, two_image_fraction: float = 0.0):
        self.gen, self.tokenizer, self.template, self.info = gen, tokenizer, template, info
        self.preprocess = preprocess
        self.patch_grid = patch_grid  # also return per-patch labels (dense auxiliary loss)
        self.turns = turns
        self.seed = seed
        self.weights = {c: 1.0 for c in CATEGORIES} | dict(category_weights or {})
        self.index_offset = index_offset  # lets a later stage draw images the earlier one never saw
        # share of two-image sequences: another image and one of its questions answered first (an
        # in-context example), then this image's questions (MMICL / Flamingo-style interleaving)
        self.two_image_fraction = float(two_image_fraction)
        if self.two_image_fraction and patch_grid:
            raise ConfigError("two-image sequences and the dense per-patch loss cannot be combined in one stage; "
                              "set dense_weight 0 or two_image_fraction 0")

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
        sample = self.gen.sample("train", self.index_offset + index)
        turns = self.turns_for(index, sample)
        if np.random.default_rng([self.seed, 0x2146, index]).random() < self.two_image_fraction:
            first = self.gen.sample("train", self.index_offset + TWO_IMAGE_OFFSET + index)
            context = self.turns_for(TWO_IMAGE_OFFSET + index, first)[:1]
            return build_example([first.image, sample.image], context + turns, self.tokenizer, self.template,
                                 self.info, images_per_turn=[1, 1] + [0] * (len(turns) - 1))
        return build_example([sample.image], turns, self.tokenizer, self.template, self.info)

    def examples(self, first: int, n: int) -> Sequence[Example]:
        return [self.example(i) for i in range(first, first + n)]

    def batch(self, first: int, n: int) -> Batch:
        batch = collate(self.examples(first, n), self.preprocess, self.info.pad_id)
        if self.patch_grid:
            from ..data.labels import stacked_patch_labels

            specs = [self.gen.spec("train", self.index_offset + i) for i in range(first, first + n)]
            batch.patch_labels = stacked_patch_labels(specs, self.patch_grid)
        return batch


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
