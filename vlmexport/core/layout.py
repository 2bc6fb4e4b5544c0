"""Sequence layout: which expert and which position id each prompt position gets.

This is the one place where the routing and position semantics of ``../DESIGN.md`` are
written down. Every backend (torch, onnxruntime, TensorRT, llama.cpp) builds its decoder
inputs from a :class:`SequenceLayout`, so they cannot drift apart.

A prompt is a sequence of *pieces*: runs of text tokens and image chunks. An image chunk
is what the connector returns for one image: for ``cogvlm`` ``boi, patch_1..patch_n,
eoi``; for ``llava`` just the patches.

``expert_routing``
  ``image_chunk``  every position of an image chunk (boi and eoi included) uses the
                   visual expert, text uses the language expert (llama.cpp's behaviour).
  ``hf_cogvlm``    as THUDM's ``CogVLMForCausalLM``: the last position of each chunk
                   (eoi) is routed to the language expert.
``image_placement``
  ``splice``       an image chunk's positions hold the connector's embeddings (the default).
  ``cross_attend`` an image chunk is its placeholder token(s) (``image_pad_id``, e.g.
                   Flamingo's ``<image>``), embedded as text; the decoder cross-attends to
                   the image instead. ``media`` says which image each position attends to:
                   the most recent image chunk starting at or before it, -1 before the first
                   (transformers' Idefics ``image_attention_mask``).
``position_ids``
  ``sequential``   one position per token, image tokens included (llama.cpp).
  ``hf_cogvlm``    boi gets p, every patch gets p+1, eoi gets p+2 (THUDM's
                   ``build_position_ids``): the patches of one image share one position.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Sequence

import numpy as np

LANGUAGE = 0
VISION = 1


class ExpertRouting(str, Enum):
    IMAGE_CHUNK = "image_chunk"
    HF_COGVLM = "hf_cogvlm"


class ImagePlacement(str, Enum):
    SPLICE = "splice"
    CROSS_ATTEND = "cross_attend"


class PositionIds(str, Enum):
    SEQUENTIAL = "sequential"
    HF_COGVLM = "hf_cogvlm"


@dataclass(frozen=True)
class TextPiece:
    ids: tuple[int, ...]


@dataclass(frozen=True)
class ImagePiece:
    length: int  # number of embeddings the connector returns for this image


Piece = TextPiece | ImagePiece


@dataclass(frozen=True)
class SequenceLayout:
    """Per-position arrays for one prompt (1-D, length = number of positions)."""

    input_ids: np.ndarray  # int64; image positions hold ``image_pad_id``
    is_image: np.ndarray  # bool; position holds an image embedding
    token_type: np.ndarray  # int64; LANGUAGE or VISION: which expert runs this position
    position_ids: np.ndarray  # int64
    image_spans: tuple[tuple[int, int], ...]  # (start, length) of each image chunk
    next_position: int  # position id of the first token generated after this prompt
    media: np.ndarray | None = None  # int64; the image chunk each position follows (-1: none); see module doc

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def build_layout(
    pieces: Sequence[Piece],
    expert_routing: str = ExpertRouting.IMAGE_CHUNK,
    position_ids: str = PositionIds.SEQUENTIAL,
    image_pad_id: int = 0,
    start_position: int = 0,
    image_placement: str = ImagePlacement.SPLICE,
) -> SequenceLayout:
    """Lay out text and image pieces and apply the routing / position semantics."""
    routing = ExpertRouting(expert_routing)
    positions = PositionIds(position_ids)
    spliced = ImagePlacement(image_placement) is ImagePlacement.SPLICE
    media: list[int] = []
    ids: list[int] = []
    is_image: list[bool] = []
    types: list[int] = []
    pos: list[int] = []
    spans: list[tuple[int, int]] = []
    p = start_position
    for piece in pieces:
        if isinstance(piece, TextPiece):
            n = len(piece.ids)
            ids.extend(int(t) for t in piece.ids)
            is_image.extend([False] * n)
            types.extend([LANGUAGE] * n)
            pos.extend(range(p, p + n))
            media.extend([len(spans) - 1] * n)
            p += n
            continue
        n = int(piece.length)
        if n <= 0:
            raise ValueError("an image chunk must hold at least one embedding")
        spans.append((len(ids), n))
        ids.extend([image_pad_id] * n)
        media.extend([len(spans) - 1] * n)
        if not spliced:  # placeholder tokens, embedded and routed as text
            is_image.extend([False] * n)
            types.extend([LANGUAGE] * n)
            pos.extend(range(p, p + n))
            p += n
            continue
        is_image.extend([True] * n)
        chunk_types = [VISION] * n
        if routing is ExpertRouting.HF_COGVLM:
            if n < 3:
                raise ValueError("hf_cogvlm routing needs boi and eoi around the patches")
            chunk_types[-1] = LANGUAGE  # eoi goes to the language expert
        types.extend(chunk_types)
        if positions is PositionIds.SEQUENTIAL:
            pos.extend(range(p, p + n))
            p += n
        else:
            if n < 3:
                raise ValueError("hf_cogvlm position ids need boi and eoi around the patches")
            pos.append(p)  # boi
            pos.extend([p + 1] * (n - 2))  # every patch shares one position
            pos.append(p + 2)  # eoi
            p += 3
    return SequenceLayout(
        input_ids=np.asarray(ids, dtype=np.int64),
        is_image=np.asarray(is_image, dtype=bool),
        token_type=np.asarray(types, dtype=np.int64),
        position_ids=np.asarray(pos, dtype=np.int64),
        image_spans=tuple(spans),
        next_position=p,
        media=np.asarray(media, dtype=np.int64),
    )
