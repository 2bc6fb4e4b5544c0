"""Dense per-patch labels of a synthetic image, for pre-training the vision encoder.

A ViT and a decoder trained together from nothing sit on a long plateau: the decoder
cannot learn to look at image tokens that carry no information yet, and the encoder gets
no useful gradient until it does. The demo recipe therefore first trains the vision
encoder alone to say, for every patch, what covers it (colour, shape or glyph, and the
character of a glyph), which the synthetic generator knows exactly from the spec. The
questions are untouched; the labels only exist for this training phase.

Label maps are rasterised from the same spec (grid units) at ``grid * SUB`` pixels
without antialiasing; a patch takes the label covering most of it if that covers at
least ``MIN_COVER`` of its area, else 0 ("nothing").
"""

from __future__ import annotations

import string

import numpy as np
from PIL import Image, ImageDraw

from . import render
from .render import COLOURS, GRID, SHAPES

SUB = 4
MIN_COVER = 0.25
CHARS = string.ascii_lowercase + string.digits
BAR, GLYPH, AXIS = len(SHAPES) + 1, len(SHAPES) + 2, len(SHAPES) + 3

LABEL_SETS = {
    "colour": 1 + len(COLOURS),  # 0 nothing, then COLOURS
    "shape": 1 + len(SHAPES) + 3,  # 0 nothing, SHAPES, bar, glyph, axis
    "char": 1 + len(CHARS),  # 0 nothing, a-z, 0-9
}


def _canvas(grid: int) -> tuple[Image.Image, ImageDraw.ImageDraw, float]:
    side = grid * SUB
    img = Image.new("L", (side, side), 0)
    return img, ImageDraw.Draw(img), side / GRID


def _pool(img: Image.Image, grid: int, n_labels: int) -> np.ndarray:
    a = np.asarray(img, dtype=np.int64).reshape(grid, SUB, grid, SUB).transpose(0, 2, 1, 3).reshape(grid, grid, -1)
    counts = np.stack([(a == k).sum(-1) for k in range(1, n_labels)], axis=-1)  # nonzero labels only
    best = counts.argmax(-1)
    cover = np.take_along_axis(counts, best[..., None], -1)[..., 0]
    return np.where(cover >= MIN_COVER * SUB * SUB, best + 1, 0)


def patch_labels(spec: dict, grid: int) -> dict[str, np.ndarray]:
    """{"colour", "shape", "char"} -> (grid, grid) int64 label maps for one spec."""
    maps = {k: _canvas(grid) for k in LABEL_SETS}
    kind = spec["kind"]
    if kind in ("scene", "count"):
        for o in spec["objects"]:
            for key, value in (("colour", 1 + COLOURS.index(o["colour"])), ("shape", 1 + SHAPES.index(o["shape"]))):
                _, draw, scale = maps[key]
                render.draw_shape(draw, o["shape"], o["x"], o["y"], o["s"], (value,), scale)
    elif kind == "chart":
        bars = spec["bars"]
        slot = (spec["x1"] - spec["x0"]) / len(bars)
        bw = slot * spec["width"] / 100.0
        for i, (colour, height) in enumerate(bars):
            cx = spec["x0"] + slot * (i + 0.5)
            box = (cx - bw / 2, spec["base"] - height, cx + bw / 2, spec["base"])
            for key, value in (("colour", 1 + COLOURS.index(colour)), ("shape", BAR)):
                _, draw, s = maps[key]
                draw.rectangle(tuple(v * s for v in box), fill=value)
    elif kind == "text":
        text, size, x, y = spec["text"], spec["size"], spec["x"], spec["y"]
        f = render.font(size)
        _, top, _, bottom = f.getbbox(text)
        for i, ch in enumerate(text):
            x0 = x + f.getlength(text[:i])
            x1 = x + f.getlength(text[: i + 1])
            box = (x0, y + top, x1, y + bottom)
            for key, value in (("shape", GLYPH), ("char", 1 + CHARS.index(ch))):
                _, draw, s = maps[key]
                draw.rectangle(tuple(v * s for v in box), fill=value)
    return {key: _pool(img, grid, LABEL_SETS[key]) for key, (img, _, _) in maps.items()}


def stacked_patch_labels(specs, grid: int):
    """Label maps of several specs as {name: LongTensor [N, grid * grid]}."""
    import torch

    maps = [patch_labels(spec, grid) for spec in specs]
    return {k: torch.from_numpy(np.stack([m[k].reshape(-1) for m in maps])) for k in LABEL_SETS}
