"""LLaVA-style JSONL conversations: writer (for synthetic samples) and validating reader.

One JSON object per line::

    {"id": "train-scene-000001", "image": "images/train-scene-000001.png",
     "category": ["colour", "count"],
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the star?"},
                       {"from": "gpt", "value": "red"},
                       {"from": "human", "value": "How many circles are there?"},
                       {"from": "gpt", "value": "2"}]}

As in LLaVA, only the first human turn carries the ``<image>`` tag. ``"category"`` is
optional (one entry per question). The reader also accepts ``user``/``assistant`` as
role names. Every problem with the file or its images raises :class:`DataError` /
:class:`ImageError` with a one-sentence message naming the file (and line).
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..core.errors import DataError, ImageError
from ..core.preprocess import open_image
from .synthetic import QA, Sample

IMAGE_TAG = "<image>"
_HUMAN = {"human", "user"}
_GPT = {"gpt", "assistant"}
_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]")

PathLike = Union[str, Path]


@dataclass(frozen=True)
class ConversationRecord:
    """One image with its (question, answer) turns, ``<image>`` tags stripped.

    ``categories`` holds the record's optional ``"category"`` list (empty if absent);
    ``source`` is ``"<jsonl path>:<line>"`` for error messages.
    """

    id: str
    image_path: Path
    turns: tuple[tuple[str, str], ...]
    categories: tuple[str, ...] = ()
    source: str = ""

    def load_image(self, image_size: int) -> np.ndarray:
        """The record's image as (image_size, image_size, 3) uint8 (see :func:`load_image`)."""
        return load_image(self.image_path, image_size, source=self.source or None)


# --------------------------------------------------------------------------- writer


def _select_qas(sample: Sample, k: Optional[int]) -> tuple[QA, ...]:
    qas = sample.qas
    if k is None or k >= len(qas):
        return qas
    seed = int(hashlib.sha1(sample.image_id.encode("utf-8")).hexdigest()[:16], 16)
    keep = np.sort(np.random.default_rng(seed).choice(len(qas), size=k, replace=False))
    return tuple(qas[i] for i in keep)


def write_llava_jsonl(samples: Iterable[Sample], out_dir: PathLike,
                      questions_per_image: Optional[int] = None) -> Path:
    """Write ``samples`` as PNGs under ``out_dir/images/`` plus ``out_dir/data.jsonl``.

    ``questions_per_image`` keeps a deterministic subset (seeded by the image id, in the
    original order) of each sample's questions; None keeps all. Returns the JSONL path.
    """
    if questions_per_image is not None and int(questions_per_image) < 1:
        raise ValueError(f"questions_per_image must be >= 1 or None, got {questions_per_image!r}")
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    jsonl = out / "data.jsonl"
    with open(jsonl, "w", encoding="utf-8") as fh:
        for sample in samples:
            qas = _select_qas(sample, questions_per_image)
            if not qas:
                continue
            name = _SAFE_ID.sub("_", sample.image_id) + ".png"
            Image.fromarray(np.ascontiguousarray(sample.image, dtype=np.uint8), "RGB").save(
                images / name, compress_level=1)
            conversations = []
            for i, qa in enumerate(qas):
                question = f"{IMAGE_TAG}\n{qa.question}" if i == 0 else qa.question
                conversations.append({"from": "human", "value": question})
                conversations.append({"from": "gpt", "value": qa.answer})
            record = {
                "id": sample.image_id,
                "image": f"images/{name}",
                "category": [qa.category for qa in qas],
                "conversations": conversations,
            }
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return jsonl


# --------------------------------------------------------------------------- reader


def _strip_tag(text: str) -> str:
    return text.replace(IMAGE_TAG, "").strip()


def _parse_turns(conv: object, where: str) -> tuple[tuple[str, str], ...]:
    hint = ('use alternating {"from": "human", "value": ...} and {"from": "gpt", "value": ...} '
            "turns, starting with a human question")
    if not isinstance(conv, list) or not conv:
        raise DataError(f'{where}: "conversations" must be a non-empty list; {hint}.')
    if len(conv) % 2:
        raise DataError(f'{where}: "conversations" has an odd number of turns ({len(conv)}); '
                        f"every question needs an answer, so {hint}.")
    turns = []
    for i in range(0, len(conv), 2):
        pair = []
        for j, roles in ((i, _HUMAN), (i + 1, _GPT)):
            turn = conv[j]
            if (not isinstance(turn, dict) or not isinstance(turn.get("value"), str)
                    or str(turn.get("from", "")).lower() not in roles):
                raise DataError(f'{where}: conversation turn {j + 1} is malformed '
                                f'(expected a {"human" if roles is _HUMAN else "gpt"} turn with '
                                f'a string "value"); {hint}.')
            pair.append(_strip_tag(turn["value"]) if roles is _HUMAN else turn["value"].strip())
        if not pair[0]:
            raise DataError(f"{where}: conversation turn {i + 1} has an empty question; "
                            f"write the question text after the {IMAGE_TAG} tag.")
        turns.append((pair[0], pair[1]))
    return tuple(turns)


def read_llava_jsonl(path: PathLike, image_root: Optional[PathLike] = None,
                     check_images: bool = True, require_images: bool = True) -> Iterator[ConversationRecord]:
    """Yield the records of a LLaVA-style JSONL file, validating each line.

    Relative image paths resolve against ``image_root`` (default: the JSONL's
    directory). Missing images raise unless ``require_images`` is False (then the
    record is yielded and :meth:`ConversationRecord.load_image` raises, which lets a
    caller skip and count them, as calibration does); with ``check_images`` each image
    header is also opened, so undecodable files and decompression bombs are reported
    with the line that references them (full decoding happens in :func:`load_image`).
    Blank lines are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist or is not a file; pass the path of a LLaVA-style .jsonl file.")
    root = Path(image_root) if image_root is not None else path.parent
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path} line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{where} is not valid UTF-8; re-save the file as UTF-8.") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where} is not valid JSON ({exc.msg} at column {exc.colno}); "
                                f"fix or remove that line.") from None
            if not isinstance(record, dict):
                raise DataError(f'{where} is not a JSON object; each line must be an object with '
                                f'"image" and "conversations".')
            image = record.get("image")
            if not isinstance(image, str) or not image.strip():
                raise DataError(f'{where} has no "image" path; add one (relative to {root}) or '
                                f"remove this text-only record.")
            if "conversations" not in record:
                raise DataError(f'{where} has no "conversations"; add the question/answer turns '
                                f"or remove the record.")
            turns = _parse_turns(record["conversations"], where)
            image_path = Path(image)
            if not image_path.is_absolute():
                image_path = root / image_path
            if not image_path.is_file() and require_images:
                raise ImageError(f"{where}: image {image_path} not found; fix the path or pass "
                                 f"image_root (relative paths resolve against {root}).")
            if check_images and require_images:
                _probe_image(image_path, where)
            categories = record.get("category", ())
            if isinstance(categories, str):
                categories = (categories,) * len(turns)
            elif isinstance(categories, list):
                categories = tuple(str(c) for c in categories)
            else:
                categories = ()
            rid = record.get("id")
            yield ConversationRecord(
                id=str(rid) if rid is not None else f"{path.stem}-{lineno}",
                image_path=image_path,
                turns=turns,
                categories=categories,
                source=f"{path}:{lineno}",
            )


# --------------------------------------------------------------------------- images


def _bomb_message(image_path: Path, where: str) -> str:
    return (f"{where}image {image_path} is larger than Pillow's decompression-bomb limit of "
            f"{Image.MAX_IMAGE_PIXELS} pixels; downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS "
            f"if you trust the file.")


def _probe_image(image_path: Path, where: str) -> None:
    prefix = f"{where}: "
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(image_path) as im:
                im.size  # noqa: B018 - header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(_bomb_message(image_path, prefix)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{prefix}image {image_path} cannot be decoded ({_short(exc)}); "
                         f"re-encode it as PNG or JPEG or remove the record.") from None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]


def load_image(path: PathLike, image_size: int, source: Optional[str] = None) -> np.ndarray:
    """Open an image with :func:`vlmexport.core.preprocess.open_image` (the decoder every
    runtime uses: alpha over white, 16-bit scaled, EXIF orientation applied, animations
    refused, size limits) and resize it (bicubic) to ``image_size`` x ``image_size``;
    returns (H, W, 3) uint8, so training sees the pixels inference sees.

    Raises :class:`ImageError` if the file is missing, cannot be decoded, or is too large;
    ``source`` (e.g. ``"data.jsonl:12"``) is named in the message when given.
    """
    path = Path(path)
    size = int(image_size)
    try:
        rgb = open_image(path, name=str(path))
    except ImageError as exc:
        raise ImageError(f"{source}: {exc}" if source else str(exc)) from None
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    return np.array(rgb, dtype=np.uint8)
