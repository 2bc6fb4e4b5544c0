"""Dense per-patch labels of a synthetic image, for pre-training the vision encoder.

A ViT and a decoder trained together from nothing sit on a long plateau: the decoder
cannot learn to look at image tokens that carry no information yet, and the encoder gets
no useful gradient until it does. The demo recipe therefore first trains the vision
encoder alone to say, for every patch, what covers it (colour, shape or glyph, and the
character of a glyph; optionally the patch's row and column, and which shape's centre it
holds), which the synthetic generator knows exactly from the spec. The questions are
untouched; the labels only exist for training.

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

CENTRE_LABELS = 1 + len(SHAPES)  # 0 no object's centre, then the shape whose centre the patch holds
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


def patch_labels(spec: dict, grid: int, centres: bool = False) -> dict[str, np.ndarray]:
    """{"colour", "shape", "char"} -> (grid, grid) int64 label maps for one spec; with
    ``centres`` also "centre": the shape of the object whose centre lies in the patch (one
    patch per object, whatever its size: what counting objects needs, where counting the
    patches a shape covers is off by one whenever objects straddle patches)."""
    maps = {k: _canvas(grid) for k in LABEL_SETS}
    kind = spec["kind"]
    centre = np.zeros((grid, grid), dtype=np.int64)
    if kind in ("scene", "count"):
        for o in spec["objects"]:
            for key, value in (("colour", 1 + COLOURS.index(o["colour"])), ("shape", 1 + SHAPES.index(o["shape"]))):
                _, draw, scale = maps[key]
                render.draw_shape(draw, o["shape"], o["x"], o["y"], o["s"], (value,), scale)
            centre[min(grid - 1, o["y"] * grid // GRID), min(grid - 1, o["x"] * grid // GRID)] = 1 + SHAPES.index(o["shape"])
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
    return ({key: _pool(img, grid, LABEL_SETS[key]) for key, (img, _, _) in maps.items()}
            | ({"centre": centre} if centres else {}))


def label_sets(grid: int, coordinates: bool = False, centres: bool = False) -> dict[str, int]:
    """The label sets a dense head predicts, name -> classes: ``LABEL_SETS``, plus each patch's
    row and column in the ``grid x grid`` patch grid when ``coordinates`` (so the features keep
    where a patch is, which "is A left of B?" needs after the encoder and the connector), plus
    "centre" when ``centres`` (which shape's centre lies in the patch, :func:`patch_labels`)."""
    return (dict(LABEL_SETS) | ({"row": grid, "col": grid} if coordinates else {})
            | ({"centre": CENTRE_LABELS} if centres else {}))


def stacked_patch_labels(specs, grid: int, coordinates: bool = False, centres: bool = False):
    """Label maps of several specs as {name: LongTensor [N, grid * grid]} (the sets of
    :func:`label_sets`)."""
    import torch

    maps = [patch_labels(spec, grid, centres) for spec in specs]
    out = {k: torch.from_numpy(np.stack([m[k].reshape(-1) for m in maps])) for k in maps[0]}
    if coordinates:
        row, col = np.divmod(np.arange(grid * grid), grid)
        out["row"] = torch.from_numpy(np.tile(row, (len(maps), 1)))
        out["col"] = torch.from_numpy(np.tile(col, (len(maps), 1)))
    return out


# ------------------------------------------------------------ where an answer is in the image
def _cover(draw_fn, grid: int) -> np.ndarray:
    """Fraction of each patch (grid x grid) that ``draw_fn(draw, scale)`` covers."""
    img, draw, scale = _canvas(grid)
    draw_fn(draw, scale)
    a = np.asarray(img, dtype=np.float64).reshape(grid, SUB, grid, SUB) > 0
    return a.mean(axis=(1, 3))


def _region(cover: np.ndarray, min_cover: float = 0.1) -> np.ndarray:
    """Flat patch indices an object occupies: every patch it covers by >= ``min_cover``,
    or the one it covers most when it is smaller than that everywhere."""
    flat = cover.reshape(-1)
    idx = np.flatnonzero(flat >= min_cover)
    return idx if idx.size else np.array([int(flat.argmax())])


def _object_region(obj: dict, grid: int) -> np.ndarray:
    return _region(_cover(lambda d, s: render.draw_shape(d, obj["shape"], obj["x"], obj["y"], obj["s"], (1,), s),
                          grid))


def _bar_region(spec: dict, i: int, grid: int) -> np.ndarray:
    bars = spec["bars"]
    slot = (spec["x1"] - spec["x0"]) / len(bars)
    bw = slot * spec["width"] / 100.0
    cx = spec["x0"] + slot * (i + 0.5)
    box = (cx - bw / 2, spec["base"] - bars[i][1], cx + bw / 2, spec["base"])
    return _region(_cover(lambda d, s: d.rectangle(tuple(v * s for v in box), fill=1), grid))


def _glyph_region(spec: dict, first: int, last: int, grid: int) -> np.ndarray:
    """Patches under the glyphs ``spec["text"][first:last]`` (the boxes ``patch_labels`` draws)."""
    text, x, y = spec["text"], spec["x"], spec["y"]
    f = render.font(spec["size"])
    _, top, _, bottom = f.getbbox(text)
    box = (x + f.getlength(text[:first]), y + top, x + f.getlength(text[:last]), y + bottom)
    return _region(_cover(lambda d, s: d.rectangle(tuple(v * s for v in box), fill=1), grid))


def reading_regions(spec: dict, pieces: list[str], grid: int) -> list[np.ndarray | None]:
    """For a text image whose answer is written as the token ``pieces`` (SentencePiece
    strings, "▁" for a space): per piece, the patches of the characters it spells, in order.
    A piece that spells no character (a lone "▁" before digits) reads the next one's; one
    past the text, or an empty one (give EOS as ""), gets None. Used by the attention loss
    on reading answers, one target per answer token: a number is read digit by digit."""
    if spec["kind"] != "text":
        return [None] * len(pieces)
    text = spec["text"]
    spans, at = [], 0
    for piece in pieces:
        n = len(piece.replace("\u2581", ""))
        spans.append((at, at + n) if n and at + n <= len(text) else None)
        at += n
    out: list[np.ndarray | None] = []
    for k, (piece, span) in enumerate(zip(pieces, spans)):
        if span is None and piece and not piece.replace("\u2581", ""):  # a lone space: the next piece's characters
            span = spans[k + 1] if k + 1 < len(spans) else None
        out.append(None if span is None else _glyph_region(spec, *span, grid))
    return out


def question_regions(spec: dict, question: str, grid: int) -> list[np.ndarray]:
    """The patches a question's answer depends on, per object the question names, in the
    order it names them (flat indices into the ``grid x grid`` patch grid).

    - colour ("What colour is the circle?"), shape ("... the red object?"), existence with
      answer yes: [the object]; existence with answer no: [] (nothing to look at);
    - position: [the first-named object, the second-named object];
    - count: [every object of that shape, as one region];
    - chart: [the tallest / shortest bar]; reading: [] (the whole text, read in order).

    Used for the question-conditioned attention loss (``training/objectives``); the
    questions themselves are untouched.
    """
    kind = spec["kind"]
    if kind == "chart":
        bars = spec["bars"]
        if "tallest" in question:
            pick = max(range(len(bars)), key=lambda i: bars[i][1])
        elif "shortest" in question:
            pick = min(range(len(bars)), key=lambda i: bars[i][1])
        else:
            return []
        return [_bar_region(spec, pick, grid)]
    if kind not in ("scene", "count"):
        return []
    objects = spec["objects"]
    words = question.rstrip("?").replace("?", " ").split()

    def named(colour: str | None, shape: str | None) -> list[dict]:
        return [o for o in objects if (colour is None or o["colour"] == colour) and (shape is None or o["shape"] == shape)]

    def phrases() -> list[tuple[str, str]]:  # every "<colour> <shape>" pair, in order
        return [(a, b) for a, b in zip(words, words[1:]) if a in COLOURS and b in SHAPES]

    groups: list[list[dict]]
    if question.startswith("What colour is the "):
        groups = [named(None, words[-1])]
    elif question.startswith("What shape is the "):
        groups = [named(words[4], None)]
    elif question.startswith("How many "):
        plural = words[2]
        groups = [[o for o in objects if render.SHAPE_PLURALS[o["shape"]] == plural]]
    elif question.startswith("Is there "):
        pair = phrases()
        groups = [named(*pair[0])] if pair else []
        groups = [g for g in groups if g]
    elif question.startswith("Is the "):
        groups = [named(*p) for p in phrases()]
    else:
        return []
    out = []
    for objs in groups:
        if not objs:
            continue
        out.append(np.unique(np.concatenate([_object_region(o, grid) for o in objs])))
    return out


def question_referents(question: str) -> list[list[str]]:
    """The words of a synthetic question that name what its answer depends on, per referent
    in the order ``question_regions`` gives their patches: "What colour is the circle?" ->
    [["circle"]], "Is the red circle left ... of the blue square?" -> [["red", "circle"],
    ["blue", "square"]], "Which bar is the tallest?" -> [["tallest"]]; reading -> []."""
    words = question.rstrip("?").replace("?", " ").split()
    if question.startswith("What colour is the "):
        return [[words[-1]]]
    if question.startswith("What shape is the "):
        return [[words[4]]]
    if question.startswith("How many "):
        return [[words[2]]]
    if question.startswith("Which bar is the "):
        return [[words[-1]]]
    pairs = [[a, b] for a, b in zip(words, words[1:]) if a in COLOURS and b in SHAPES]
    if question.startswith("Is there "):
        return pairs[:1]
    if question.startswith("Is the "):
        return pairs[:2]
    return []
