"""Turn (images, question/answer turns) into model inputs with the shared prompt code.

The same ``render`` + ``build_layout`` that the runtimes use lays out training
sequences, so a trained model sees at inference exactly the token layout, routing and
positions it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..core.errors import DataError
from ..core.layout import build_layout
from ..core.preprocess import PreprocessConfig
from ..core.prompt import ChatTemplate, Turn, render

IGNORE = -100


@dataclass(frozen=True)
class ModelLayoutInfo:
    """What the prompt layout needs to know about a model."""

    image_tokens: int
    expert_routing: str
    position_ids: str
    pad_id: int
    max_length: int
    image_placement: str = "splice"
    image_pad_id: int | None = None  # what an image's positions hold (None: pad_id)

    @classmethod
    def of(cls, model) -> "ModelLayoutInfo":
        c = model.config
        return cls(model.image_tokens(), c.expert_routing, c.position_ids, c.pad_token_id, c.max_position_embeddings,
                   model.image_placement, model.image_placeholder_id())


@dataclass
class Example:
    input_ids: np.ndarray
    targets: np.ndarray  # next-token targets, IGNORE where not supervised
    token_type: np.ndarray
    position_ids: np.ndarray
    is_image: np.ndarray
    images: list[np.ndarray]  # uint8 HxWx3, in order of appearance


def build_example(images: Sequence[np.ndarray], turns: Sequence[tuple[str, str]], tokenizer, template: ChatTemplate,
                  info: ModelLayoutInfo, images_per_turn: Sequence[int] | None = None) -> Example:
    """One training sequence: images go where the first question's placeholders are
    (or right after BOS), each answer and its EOS are supervised. ``images_per_turn``
    spreads the images over the turns instead (interleaved image-text, e.g. an in-context
    example before the question). Turns that do not fit the context are dropped from the
    end (with their images)."""
    turns = list(turns)
    per_turn = list(images_per_turn) if images_per_turn is not None else [len(images)] + [0] * (len(turns) - 1)
    if len(per_turn) != len(turns) or sum(per_turn) != len(images):
        raise DataError(f"images_per_turn {per_turn} does not spread {len(images)} image(s) over {len(turns)} turn(s)")
    images = list(images)
    while True:
        conv = [Turn(user=q, images=per_turn[i], answer=a) for i, (q, a) in enumerate(turns)]
        rendered = render(template, conv, tokenizer, info.image_tokens)
        if rendered.length <= info.max_length:
            break
        if len(turns) == 1:
            raise DataError(f"a training example needs {rendered.length} positions but the model's context is "
                            f"{info.max_length}; shorten the conversation or raise max_position_embeddings")
        turns.pop()
        dropped = per_turn.pop()
        images = images[:len(images) - dropped]
    layout = build_layout(rendered.pieces, info.expert_routing, info.position_ids,
                          image_pad_id=info.pad_id if info.image_pad_id is None else info.image_pad_id,
                          image_placement=info.image_placement)
    targets = np.full(len(layout), IGNORE, dtype=np.int64)
    for start, end in rendered.answer_spans:
        # position t predicts token t+1
        targets[start - 1:end - 1] = layout.input_ids[start:end]
    return Example(layout.input_ids, targets, layout.token_type, layout.position_ids, layout.is_image, list(images))


@dataclass
class AttentionTargets:
    rows: torch.Tensor  # [T] long
    query_pos: torch.Tensor  # [T] long
    heads: torch.Tensor  # [T] long
    keys: torch.Tensor  # [T, S] bool
    # [T] bool: spread the attention evenly over the keys (else: only its mass on them counts); None: none do
    spread: torch.Tensor | None = None

    def to(self, device) -> "AttentionTargets":
        return AttentionTargets(self.rows.to(device), self.query_pos.to(device), self.heads.to(device),
                                self.keys.to(device), None if self.spread is None else self.spread.to(device))


def answer_query_positions(targets: np.ndarray) -> list[int]:
    """The position that predicts each answer's first token: the first of every run of
    supervised positions (answers are separated by unsupervised question tokens)."""
    sup = targets != IGNORE
    return [int(i) for i in np.flatnonzero(sup & ~np.concatenate(([False], sup[:-1])))]


@dataclass
class Batch:
    input_ids: torch.Tensor
    targets: torch.Tensor
    token_type: torch.Tensor
    position_ids: torch.Tensor
    is_image: torch.Tensor
    pixel_values: torch.Tensor | None
    # per-patch labels of each image (``data/labels.py``), for the dense auxiliary loss
    patch_labels: dict[str, torch.Tensor] | None = None
    # where each supervised answer is in the image (question-conditioned attention loss): one row per
    # (answer, head): the batch row, the position that predicts the answer's first token, the head,
    # and a [T, S] mask of the key positions (image tokens) the head should read
    attention_targets: "AttentionTargets | None" = None
    # the same for the first decoder layer: at the position that predicts an answer, which question
    # tokens name what the answer depends on (keys are text positions)
    word_targets: "AttentionTargets | None" = None

    def to(self, device) -> "Batch":
        moved = [t.to(device) if t is not None else None for t in (
            self.input_ids, self.targets, self.token_type, self.position_ids, self.is_image, self.pixel_values)]
        labels = {k: v.to(device) for k, v in self.patch_labels.items()} if self.patch_labels else None
        attn = self.attention_targets.to(device) if self.attention_targets is not None else None
        words = self.word_targets.to(device) if self.word_targets is not None else None
        return Batch(*moved, patch_labels=labels, attention_targets=attn, word_targets=words)

    @property
    def supervised_tokens(self) -> int:
        return int((self.targets != IGNORE).sum())


def collate(examples: Sequence[Example], preprocess: PreprocessConfig, pad_id: int) -> Batch:
    """Right-pad to the longest example (causal attention never looks right, so no mask)."""
    S = max(len(e.input_ids) for e in examples)
    B = len(examples)
    ids = np.full((B, S), pad_id, dtype=np.int64)
    tgt = np.full((B, S), IGNORE, dtype=np.int64)
    typ = np.zeros((B, S), dtype=np.int64)
    pos = np.zeros((B, S), dtype=np.int64)
    img = np.zeros((B, S), dtype=bool)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n], tgt[i, :n], typ[i, :n], img[i, :n] = e.input_ids, e.targets, e.token_type, e.is_image
        pos[i, :n] = e.position_ids
        if n < S:  # keep padded positions increasing so RoPE tables stay well-formed
            pos[i, n:] = e.position_ids[-1] + 1 + np.arange(S - n)
    images = [im for e in examples for im in e.images]
    pixels = pixels_from_uint8(np.stack(images), preprocess) if images else None
    return Batch(torch.from_numpy(ids), torch.from_numpy(tgt), torch.from_numpy(typ), torch.from_numpy(pos),
                 torch.from_numpy(img), pixels)


def pixels_from_uint8(images: np.ndarray, preprocess: PreprocessConfig) -> torch.Tensor:
    """[N, H, W, 3] uint8 (already at the model's size) -> normalised [N, 3, H, W] float32."""
    s = preprocess.image_size
    if images.shape[1:3] != (s, s):
        raise ValueError(f"training images must be {s}x{s}; got {images.shape[1]}x{images.shape[2]}")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(preprocess.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.image_std).view(1, 3, 1, 1)
    return (x - mean) / std
