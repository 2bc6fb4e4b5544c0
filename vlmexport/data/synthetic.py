"""Deterministic, seeded synthetic VQA data for training and evaluating demo models.

Image kinds and their share of every split (chosen when a sample's spec is drawn):

========  =====  ===============================================================
kind      share  questions (categories)
========  =====  ===============================================================
scene      30 %  1-6 random objects: colour, shape, count, position, existence
count      30 %  "count scene": k = 2..5 copies of one shape plus 0-2 distractors
                 of other shapes; same categories as a scene (image id ``scene``)
text       20 %  a word (50-word list) or a number 0-999: reading
chart      20 %  3-5 coloured vertical bars: chart (tallest and shortest bar)
========  =====  ===============================================================

So about 60 % of the images are object scenes, 20 % text and 20 % bar charts. The
count scenes make counts 3, 4 and 5 common enough that :meth:`SyntheticVQA.eval_items`
can balance the count answers over 1..5.

Determinism and split disjointness
----------------------------------
A sample is a pure function of ``(seed, split, index, image_size)``: its random stream
is ``np.random.default_rng(SeedSequence([domain, seed, split, index]))``. What is drawn
is a *spec*: every generating parameter as integers on a fixed 384 x 384 grid (so the
same spec renders the same picture at any resolution). The sha1 of the spec's canonical
JSON assigns the spec to a split bucket (train 90 %, val 5 %, test 5 %); a spec drawn
for split S whose hash falls in another bucket is discarded and the stream draws again.
Hence an identical spec (and therefore an identical image) can only ever occur in one
split, whatever the seed. The background noise and the random choices made while
writing questions (which pair orientation, which absent object) are seeded from the
spec hash, so they are a function of the spec alone.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from . import render
from .render import COLOUR_RGB, COLOURS, GRID, SHAPE_PLURALS, SHAPES

CATEGORIES = ("colour", "shape", "count", "position", "existence", "reading", "chart")
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = {"train": 0.90, "val": 0.05, "test": 0.05}
KIND_MIX = (("scene", 0.30), ("count", 0.30), ("text", 0.20), ("chart", 0.20))

WORDS = (
    "cat", "dog", "sun", "car", "tree", "book", "fish", "bird", "home", "milk",
    "door", "hand", "moon", "ball", "cake", "road", "rain", "snow", "fire", "ship",
    "boat", "lamp", "desk", "chair", "table", "water", "apple", "bread", "river", "horse",
    "train", "clock", "music", "paper", "light", "king", "park", "city", "key", "map",
    "egg", "bus", "cup", "pen", "box", "hat", "sky", "sea", "leaf", "kite",
)
"""Reading vocabulary: 50 common lowercase words of 3-5 letters, all narrow enough to be
drawn at >= 30 % of the image height (font size) inside the image."""

NUMBER_RANGE = (0, 999)
COUNT_RANGE = (1, 5)
POSITION_ANSWERS = ("left", "right", "above", "below")

EXISTENCE_SUFFIX = " Please answer yes or no."

_SPEC_VERSION = 1
_DOMAIN = 0x564C4D58  # separates this generator's streams from any other SeedSequence use
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
_MAX_DRAWS = 10_000

# Geometry on the GRID x GRID spec grid.
_OBJ_MIN = round(0.13 * GRID)  # object bounding-box side: 13-22 % of the image side
_OBJ_MAX = round(0.22 * GRID)
_OBJ_GAP = round(0.04 * GRID)  # free space between object bounding boxes
_BORDER = round(0.03 * GRID)  # free space between objects and the image border
_POS_MIN_DIFF = round(0.25 * GRID)  # centres differ by >= 25 % of the side to ask
_TEXT_MARGIN = round(0.06 * GRID)
_TEXT_MIN = math.ceil(0.30 * GRID)  # font size (em) range, as a fraction of the side
_TEXT_MAX = round(0.50 * GRID)
_CHART_GAP = 0.14  # tallest/shortest bar differ from their rank neighbours by >= 14 %
_AXIS = 6


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, eq=False)
class QA:
    """One question about an image."""

    category: str
    question: str
    answer: str
    kind: str  # "open" or "yesno"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QA):
            return NotImplemented
        return (self.category, self.question, self.answer, self.kind) == (
            other.category, other.question, other.answer, other.kind)

    def __hash__(self) -> int:
        return hash((self.category, self.question, self.answer, self.kind))


@dataclass(frozen=True, eq=False)
class Sample:
    """One synthetic image with every valid question about it.

    Equality compares the pixels (``np.array_equal``) and all other fields.
    """

    image_id: str
    image: np.ndarray  # (H, W, 3) uint8
    qas: tuple[QA, ...]
    split: str

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sample):
            return NotImplemented
        return (self.image_id == other.image_id and self.split == other.split
                and self.qas == other.qas and np.array_equal(self.image, other.image))

    def __hash__(self) -> int:
        return hash((self.image_id, self.split, self.qas))


@dataclass(frozen=True, eq=False)
class EvalItem:
    """One evaluation question. ``pair_id`` links the two questions of an MME yes/no
    pair (same image, one answer "yes", one "no"); it is None for open questions."""

    image_id: str
    image: np.ndarray
    category: str
    question: str
    answer: str
    kind: str
    pair_id: Optional[str]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EvalItem):
            return NotImplemented
        return ((self.image_id, self.category, self.question, self.answer, self.kind, self.pair_id)
                == (other.image_id, other.category, other.question, other.answer, other.kind,
                    other.pair_id)
                and np.array_equal(self.image, other.image))

    def __hash__(self) -> int:
        return hash((self.image_id, self.category, self.question, self.answer, self.pair_id))


@dataclass(frozen=True, eq=False)
class TwoImageItem(EvalItem):
    """An evaluation question about ``image`` asked after an in-context example: another image
    (``context_image``) with one of its questions and the answer (a two-image, interleaved prompt)."""

    context_image: np.ndarray = None  # type: ignore[assignment]
    context_question: str = ""
    context_answer: str = ""

    @property
    def context(self) -> tuple[tuple[np.ndarray, str, str], ...]:
        return ((self.context_image, self.context_question, self.context_answer),)


# --------------------------------------------------------------------------- helpers


class _Stream:
    """Fast scalar draws from a numpy Generator (floats drawn in blocks)."""

    __slots__ = ("_rng", "_buf", "_i")

    def __init__(self, rng: np.random.Generator):
        self._rng = rng
        self._buf: list[float] = rng.random(128).tolist()
        self._i = 0

    def random(self) -> float:
        if self._i >= len(self._buf):
            self._buf = self._rng.random(128).tolist()
            self._i = 0
        v = self._buf[self._i]
        self._i += 1
        return v

    def randint(self, lo: int, hi: int) -> int:
        """Uniform integer in [lo, hi] (inclusive)."""
        n = hi - lo + 1
        return lo + min(int(self.random() * n), n - 1)

    def choice(self, seq):
        return seq[min(int(self.random() * len(seq)), len(seq) - 1)]

    def sample(self, seq, k: int) -> list:
        pool = list(seq)
        for i in range(k):
            j = i + min(int(self.random() * (len(pool) - i)), len(pool) - i - 1)
            pool[i], pool[j] = pool[j], pool[i]
        return pool[:k]

    def shuffle(self, items: list) -> None:
        for i in range(len(items) - 1, 0, -1):
            j = min(int(self.random() * (i + 1)), i)
            items[i], items[j] = items[j], items[i]


def canonical_json(spec: dict) -> str:
    """The canonical JSON text of a spec (sorted keys, no whitespace)."""
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


def spec_digest(spec: dict) -> str:
    """sha1 hex digest of the spec's canonical JSON."""
    return hashlib.sha1(canonical_json(spec).encode("utf-8")).hexdigest()


def split_of_digest(digest: str) -> str:
    """The split bucket a spec hash belongs to (train 90 %, val 5 %, test 5 %)."""
    u = int(digest[:13], 16) / float(16 ** 13)
    acc = 0.0
    for split in SPLITS:
        acc += SPLIT_FRACTIONS[split]
        if u < acc:
            return split
    return SPLITS[-1]


def _check_split(split: str) -> None:
    if split not in _SPLIT_CODE:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def _image_kind(spec: dict) -> str:
    return "scene" if spec["kind"] in ("scene", "count") else spec["kind"]


def _background(st: _Stream) -> dict:
    base = st.choice(render.BACKGROUNDS)
    bg = [min(255, max(228, c + st.randint(-4, 4))) for c in base]
    return {"bg": bg, "grad": [st.randint(-6, 6), st.randint(-6, 6)]}


# --------------------------------------------------------------------------- spec drawing


def _draw_scene(st: _Stream, kind: str) -> dict:
    if kind == "count":
        target = st.choice(SHAPES)
        k = st.randint(2, 5)
        n_distract = st.randint(0, min(2, 6 - k))
        others = [s for s in SHAPES if s != target]
        items = [(target, st.choice(COLOURS)) for _ in range(k)]
        items += [(st.choice(others), st.choice(COLOURS)) for _ in range(n_distract)]
        st.shuffle(items)
    else:
        n = st.randint(1, 6)
        items = [(st.choice(SHAPES), st.choice(COLOURS)) for _ in range(n)]
    boxes = _place(st, len(items))
    objects = []
    for (shape, colour), (x, y, s) in zip(items, boxes):
        rgb = [min(255, max(0, c + st.randint(-6, 6))) for c in COLOUR_RGB[colour]]
        objects.append({"shape": shape, "colour": colour, "rgb": rgb, "x": x, "y": y, "s": s})
    return {"v": _SPEC_VERSION, "kind": kind, **_background(st), "objects": objects}


def _place(st: _Stream, n: int) -> list[tuple[int, int, int]]:
    """Non-overlapping (centre x, centre y, side) boxes fully inside the grid."""
    for attempt in range(12):
        hi = max(_OBJ_MIN, round(_OBJ_MAX * (1.0 - 0.05 * attempt)))
        sizes = [st.randint(_OBJ_MIN, hi) for _ in range(n)]
        placed: list[tuple[int, int, int]] = []
        for s in sizes:
            lo_c, hi_c = _BORDER + (s + 1) // 2, GRID - _BORDER - (s + 1) // 2
            for _ in range(80):
                x, y = st.randint(lo_c, hi_c), st.randint(lo_c, hi_c)
                if all(abs(x - px) * 2 >= s + ps + 2 * _OBJ_GAP or abs(y - py) * 2 >= s + ps + 2 * _OBJ_GAP
                       for px, py, ps in placed):
                    placed.append((x, y, s))
                    break
            else:
                break
        if len(placed) == n:
            return placed
    raise RuntimeError(f"could not place {n} objects")  # pragma: no cover - never seen


def _draw_text(st: _Stream) -> dict:
    if st.random() < 0.5:
        text, is_number = st.choice(WORDS), False
    else:
        text, is_number = str(st.randint(*NUMBER_RANGE)), True
    size = st.randint(_TEXT_MIN, _TEXT_MAX)
    max_w = GRID - 2 * _TEXT_MARGIN
    left, top, right, bottom = render.text_bbox(text, size)
    if right - left > max_w:
        size = int(size * max_w / (right - left))
        left, top, right, bottom = render.text_bbox(text, size)
    x = st.randint(_TEXT_MARGIN - left, GRID - _TEXT_MARGIN - right)
    y = st.randint(_TEXT_MARGIN - top, GRID - _TEXT_MARGIN - bottom)
    rgb = list(st.choice(render.TEXT_RGB))
    return {"v": _SPEC_VERSION, "kind": "text", **_background(st), "text": text,
            "number": is_number, "size": size, "x": x, "y": y, "rgb": rgb}


def _draw_chart(st: _Stream) -> dict:
    n = st.randint(3, 5)
    colours = st.sample(COLOURS, n)
    x0, x1 = st.randint(40, 66), st.randint(328, 354)
    base_y, top_y = st.randint(318, 350), st.randint(26, 60)
    hmax = base_y - top_y
    tallest = 0.80 + 0.20 * st.random()
    shortest = 0.12 + 0.26 * st.random()
    lo, hi = shortest + _CHART_GAP, tallest - _CHART_GAP
    fracs = [tallest, shortest] + [lo + (hi - lo) * st.random() for _ in range(n - 2)]
    st.shuffle(fracs)
    heights = [int(round(f * hmax)) for f in fracs]
    return {"v": _SPEC_VERSION, "kind": "chart", **_background(st),
            "bars": [[c, h] for c, h in zip(colours, heights)],
            "x0": x0, "x1": x1, "base": base_y, "width": st.randint(50, 75)}


def _draw_spec(st: _Stream) -> dict:
    u = st.random()
    acc = 0.0
    kind = KIND_MIX[-1][0]
    for name, share in KIND_MIX:
        acc += share
        if u < acc:
            kind = name
            break
    if kind in ("scene", "count"):
        return _draw_scene(st, kind)
    if kind == "text":
        return _draw_text(st)
    return _draw_chart(st)


# --------------------------------------------------------------------------- questions


def _qa_stream(digest: str) -> _Stream:
    return _Stream(np.random.default_rng(int(digest[:16], 16)))


def questions(spec: dict, digest: Optional[str] = None) -> tuple[QA, ...]:
    """Every valid question about the image a spec describes, in CATEGORIES order."""
    digest = digest or spec_digest(spec)
    kind = spec["kind"]
    if kind == "text":
        what = "number" if spec["number"] else "word"
        return (QA("reading", f"What {what} is written in the image?", spec["text"], "open"),)
    if kind == "chart":
        bars = spec["bars"]
        tallest = max(bars, key=lambda b: b[1])[0]
        shortest = min(bars, key=lambda b: b[1])[0]
        return (QA("chart", "Which bar is the tallest?", tallest, "open"),
                QA("chart", "Which bar is the shortest?", shortest, "open"))
    return _scene_questions(spec["objects"], _qa_stream(digest))


def _scene_questions(objects: list[dict], st: _Stream) -> tuple[QA, ...]:
    shape_n = Counter(o["shape"] for o in objects)
    colour_n = Counter(o["colour"] for o in objects)
    combo_n = Counter((o["colour"], o["shape"]) for o in objects)
    qas: list[QA] = []
    for shape in SHAPES:
        if shape_n[shape] == 1:
            obj = next(o for o in objects if o["shape"] == shape)
            qas.append(QA("colour", f"What colour is the {shape}?", obj["colour"], "open"))
    for colour in COLOURS:
        if colour_n[colour] == 1:
            obj = next(o for o in objects if o["colour"] == colour)
            qas.append(QA("shape", f"What shape is the {colour} object?", obj["shape"], "open"))
    for shape in SHAPES:
        if COUNT_RANGE[0] <= shape_n[shape] <= COUNT_RANGE[1]:
            qas.append(QA("count", f"How many {SHAPE_PLURALS[shape]} are there?",
                          str(shape_n[shape]), "open"))
    unique = [o for o in objects if combo_n[(o["colour"], o["shape"])] == 1]
    for i in range(len(unique)):
        for j in range(i + 1, len(unique)):
            for axis in ("x", "y"):
                a, b = unique[i], unique[j]
                if st.random() < 0.5:
                    a, b = b, a
                if abs(a[axis] - b[axis]) < _POS_MIN_DIFF:
                    continue
                na, nb = f"{a['colour']} {a['shape']}", f"{b['colour']} {b['shape']}"
                if axis == "x":
                    q = f"Is the {na} to the left or to the right of the {nb}?"
                    ans = "left" if a["x"] < b["x"] else "right"
                else:
                    q = f"Is the {na} above or below the {nb}?"
                    ans = "above" if a["y"] < b["y"] else "below"
                qas.append(QA("position", q, ans, "open"))
    present = sorted(combo_n)
    shapes_present, colours_present = set(shape_n), set(colour_n)
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in combo_n]
    hard = [(c, s) for c, s in absent if s in shapes_present or c in colours_present]
    yes = st.choice(present)
    no = st.choice(hard) if hard and st.random() < 0.8 else st.choice(absent)
    pair = [QA("existence", _existence_question(*yes), "yes", "yesno"),
            QA("existence", _existence_question(*no), "no", "yesno")]
    if st.random() < 0.5:
        pair.reverse()
    qas.extend(pair)
    return tuple(qas)


def _existence_question(colour: str, shape: str) -> str:
    article = "an" if colour[0] in "aeiou" else "a"
    return f"Is there {article} {colour} {shape} in the image?{EXISTENCE_SUFFIX}"


def render_spec(spec: dict, image_size: int, digest: Optional[str] = None) -> np.ndarray:
    """Render a spec to a (image_size, image_size, 3) uint8 array."""
    digest = digest or spec_digest(spec)
    canvas, draw, scale = render.new_canvas(image_size, spec["bg"])
    kind = spec["kind"]
    if kind in ("scene", "count"):
        for o in spec["objects"]:
            render.draw_shape(draw, o["shape"], o["x"], o["y"], o["s"], o["rgb"], scale)
    elif kind == "text":
        render.draw_text(draw, spec["text"], spec["x"], spec["y"], spec["size"], spec["rgb"], scale)
    elif kind == "chart":
        render.draw_bar_chart(draw, [tuple(b) for b in spec["bars"]], spec["x0"], spec["x1"],
                              spec["base"], spec["width"] / 100.0, _AXIS, scale)
    else:  # pragma: no cover - specs are produced by this module
        raise ValueError(f"unknown spec kind {kind!r}")
    return render.finish(canvas, image_size, spec["grad"], int(digest[16:32], 16))


# --------------------------------------------------------------------------- generator


def _facets(qa: QA) -> dict[str, str]:
    """The values eval_items balances for a question (one quota per facet value)."""
    if qa.category == "reading":
        return {"type": "number" if "number" in qa.question else "word"}
    if qa.category == "chart":
        return {"question": "tallest" if "tallest" in qa.question else "shortest",
                "answer": qa.answer}
    return {"answer": qa.answer}


def _facet_values(category: str) -> dict[str, list[str]]:
    if category == "reading":
        return {"type": ["word", "number"]}
    if category == "chart":
        return {"question": ["tallest", "shortest"], "answer": list(COLOURS)}
    answers = {
        "colour": list(COLOURS),
        "shape": list(SHAPES),
        "count": [str(i) for i in range(COUNT_RANGE[0], COUNT_RANGE[1] + 1)],
        "position": list(POSITION_ANSWERS),
    }
    return {"answer": answers[category]}


class SyntheticVQA:
    """Seeded synthetic VQA generator (see the module docstring for the design).

    ``sample(split, index)`` is a deterministic function of (seed, split, index,
    image_size); the scene content does not depend on ``image_size`` (only its
    resolution does).
    """

    def __init__(self, image_size: int = 96, seed: int = 0):
        if not isinstance(image_size, (int, np.integer)) or not 32 <= int(image_size) <= 1024:
            raise ValueError(f"image_size must be an integer in [32, 1024], got {image_size!r}")
        if not isinstance(seed, (int, np.integer)) or int(seed) < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.image_size = int(image_size)
        self.seed = int(seed)

    def __repr__(self) -> str:
        return f"SyntheticVQA(image_size={self.image_size}, seed={self.seed})"

    # -- specs ---------------------------------------------------------------
    def _spec(self, split: str, index: int) -> tuple[dict, str]:
        _check_split(split)
        if not isinstance(index, (int, np.integer)) or int(index) < 0:
            raise ValueError(f"index must be a non-negative integer, got {index!r}")
        rng = np.random.default_rng(
            np.random.SeedSequence([_DOMAIN, self.seed, _SPLIT_CODE[split], int(index)]))
        st = _Stream(rng)
        for _ in range(_MAX_DRAWS):
            spec = _draw_spec(st)
            digest = spec_digest(spec)
            if split_of_digest(digest) == split:
                return spec, digest
        raise RuntimeError(f"no {split} spec after {_MAX_DRAWS} draws")  # pragma: no cover

    def spec(self, split: str, index: int) -> dict:
        """The generating spec of ``sample(split, index)`` (JSON-serialisable)."""
        return self._spec(split, index)[0]

    def spec_hash(self, split: str, index: int) -> str:
        """sha1 of the canonical JSON of the spec; it determines the split bucket."""
        return self._spec(split, index)[1]

    def image_id(self, split: str, index: int, spec: Optional[dict] = None) -> str:
        spec = spec if spec is not None else self.spec(split, index)
        return f"{split}-{_image_kind(spec)}-{int(index):06d}"

    # -- samples -------------------------------------------------------------
    def sample(self, split: str, index: int) -> Sample:
        spec, digest = self._spec(split, index)
        return Sample(
            image_id=self.image_id(split, index, spec),
            image=render_spec(spec, self.image_size, digest),
            qas=questions(spec, digest),
            split=split,
        )

    def samples(self, split: str, n: int, start: int = 0) -> Iterator[Sample]:
        _check_split(split)
        for i in range(start, start + n):
            yield self.sample(split, i)

    # -- evaluation ----------------------------------------------------------
    def eval_items(self, split: str, n_per_category: int) -> list[EvalItem]:
        """A balanced evaluation set: exactly ``n_per_category`` items per category.

        Images are scanned in index order from 0. Open categories take at most one
        question per image, chosen to fill quotas (colour, shape, count, position: per
        answer; reading: words vs numbers; chart: tallest vs shortest and per colour),
        so answers are as balanced as ``n_per_category`` allows. Existence
        takes both questions of an image's MME pair (2 items, same ``pair_id``), so
        ``n_per_category`` must be even. Items are grouped by category in CATEGORIES
        order.
        """
        _check_split(split)
        n = int(n_per_category)
        if n < 0 or n % 2:
            raise ValueError(
                f"n_per_category must be a non-negative even number (existence questions "
                f"come in yes/no pairs), got {n_per_category!r}")
        # quotas[cat][facet][value]: how many more items may have that value.
        quotas: dict[str, dict[str, dict[str, int]]] = {}
        for cat in CATEGORIES:
            if cat == "existence":
                continue
            quotas[cat] = {
                facet: {v: n // len(vals) + (1 if i < n % len(vals) else 0)
                        for i, v in enumerate(vals)}
                for facet, vals in _facet_values(cat).items()
            }
        need = {cat: n for cat in CATEGORIES}
        chosen: dict[str, list[tuple[int, tuple[QA, ...]]]] = {cat: [] for cat in CATEGORIES}
        specs: dict[int, tuple[dict, str]] = {}
        limit = 2000 + 400 * n
        index = 0
        while any(need.values()):
            if index >= limit:  # pragma: no cover - generator mix guarantees supply
                raise RuntimeError(f"could not fill eval quotas after {limit} images: {need}")
            spec, digest = self._spec(split, index)
            by_cat: dict[str, list[QA]] = {}
            for qa in questions(spec, digest):
                by_cat.setdefault(qa.category, []).append(qa)
            used = False
            for cat, qas in by_cat.items():
                if not need[cat]:
                    continue
                if cat == "existence":
                    chosen[cat].append((index, tuple(qas)))
                    need[cat] -= len(qas)
                    used = True
                    continue
                quota = quotas[cat]

                def room(qa: QA) -> int:
                    return min(quota[f].get(v, 0) for f, v in _facets(qa).items())

                best = max(qas, key=room)
                if room(best) > 0:
                    for f, v in _facets(best).items():
                        quota[f][v] -= 1
                    need[cat] -= 1
                    chosen[cat].append((index, (best,)))
                    used = True
            if used:
                specs[index] = (spec, digest)
            index += 1

        images: dict[int, np.ndarray] = {}
        items: list[EvalItem] = []
        for cat in CATEGORIES:
            for idx, qas in chosen[cat]:
                spec, digest = specs[idx]
                if idx not in images:
                    images[idx] = render_spec(spec, self.image_size, digest)
                image_id = self.image_id(split, idx, spec)
                pair_id = f"{image_id}-existence" if cat == "existence" else None
                for qa in qas:
                    items.append(EvalItem(image_id, images[idx], qa.category, qa.question,
                                          qa.answer, qa.kind, pair_id))
        return items

    # -- text ----------------------------------------------------------------
    def two_image_items(self, split: str, n_per_category: int) -> list[TwoImageItem]:
        """:meth:`eval_items`, each asked after an in-context example about another image of the
        split (the item half the list away, whose question and answer come first)."""
        items = self.eval_items(split, n_per_category)
        out = []
        for i, it in enumerate(items):
            ctx = items[(i + len(items) // 2) % len(items)]
            if ctx.image_id == it.image_id:  # never the same picture twice
                ctx = next(c for c in items if c.image_id != it.image_id)
            out.append(TwoImageItem(it.image_id, it.image, it.category, it.question, it.answer, it.kind, it.pair_id,
                                    context_image=ctx.image, context_question=ctx.question,
                                    context_answer=ctx.answer))
        return out

    def corpus(self, n_samples: int) -> list[str]:
        """Question and answer strings of the first ``n_samples`` train images (no
        rendering), e.g. for training a tokenizer. Rare answers (most of the 1000
        numbers) may be missing for small n: add :meth:`answer_vocabulary` if needed."""
        out: list[str] = []
        for i in range(int(n_samples)):
            spec, digest = self._spec("train", i)
            for qa in questions(spec, digest):
                out.append(qa.question)
                out.append(qa.answer)
        return out

    @staticmethod
    def answer_vocabulary() -> dict[str, list[str]]:
        """Every possible answer, per category."""
        return {
            "colour": list(COLOURS),
            "shape": list(SHAPES),
            "count": [str(i) for i in range(COUNT_RANGE[0], COUNT_RANGE[1] + 1)],
            "position": list(POSITION_ANSWERS),
            "existence": ["yes", "no"],
            "reading": list(WORDS) + [str(i) for i in range(NUMBER_RANGE[0], NUMBER_RANGE[1] + 1)],
            "chart": list(COLOURS),
        }


__all__ = [
    "CATEGORIES", "SPLITS", "SPLIT_FRACTIONS", "KIND_MIX", "WORDS", "QA", "Sample", "EvalItem",
    "SyntheticVQA", "questions", "render_spec", "spec_digest", "split_of_digest", "canonical_json",
]

