"""Checks of what a caller hands the pipeline (``generate`` / ``stream`` / ``chat``).

A server passes prompts and images from anyone, so a wrong type or undecodable text is
one :class:`ArgumentError` line naming the argument and the fix, never a TypeError deep
inside the tokenizer or the image decoder.
"""

from __future__ import annotations

import os
from dataclasses import fields
from typing import Any

import numpy as np

from ..core.errors import VlmexportError
from ..core.generation import GenerationConfig

MAX_PROMPT_CHARS = 1 << 20  # 1M characters: far past any context; refused before tokenizing
MAX_IMAGES = 256
GENERATION_OPTIONS = tuple(f.name for f in fields(GenerationConfig))


class ArgumentError(VlmexportError, TypeError):
    """An argument of the pipeline API has the wrong type or cannot be used (a TypeError too)."""


def check_text(text: Any, what: str = "prompt") -> str:
    """``text`` is a str of valid UTF-8 (no lone surrogates) and of bounded length."""
    if not isinstance(text, str):
        raise ArgumentError(f"{what} must be a str, not {type(text).__name__}; pass the question as text")
    if len(text) > MAX_PROMPT_CHARS:
        raise ArgumentError(f"{what} has {len(text):,} characters, more than any context holds "
                            f"({MAX_PROMPT_CHARS:,}); shorten it")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: bytes that were not UTF-8 (surrogateescape'd argv)
        bad = text[exc.start].encode("utf-8", "surrogateescape")
        raise ArgumentError(f"{what} is not valid UTF-8 (byte {bad!r} at character {exc.start}); re-encode the text "
                            "as UTF-8") from None
    return text


def check_images(images: Any) -> list:
    """``images`` is a list/tuple of images (paths, bytes, PIL images, arrays), not one image."""
    if images is None:
        return []
    one = isinstance(images, (str, bytes, bytearray, os.PathLike, np.ndarray)) or hasattr(images, "getbands")
    if one or not isinstance(images, (list, tuple)):
        kind = type(images).__name__
        hint = "wrap the one image in a list: images=[image]" if one else "pass a list of images"
        raise ArgumentError(f"images must be a list of images, not a {kind}; {hint}")
    if len(images) > MAX_IMAGES:
        raise ArgumentError(f"{len(images)} images in one prompt is more than {MAX_IMAGES}; pass fewer")
    return list(images)


def check_options(options: dict) -> dict:
    """Generation keyword arguments are ones :class:`GenerationConfig` has."""
    unknown = sorted(set(options) - set(GENERATION_OPTIONS))
    if unknown:
        raise ArgumentError(f"unknown generation option(s) {unknown}; use {list(GENERATION_OPTIONS)}")
    return options


def check_messages(messages: Any) -> list[dict]:
    """``chat`` messages: a list of Message objects or dicts with role, content and optional images."""
    if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, (list, tuple)):
        raise ArgumentError(f"messages must be a list of {{'role', 'content'}} messages, not a "
                            f"{type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        d = m if isinstance(m, dict) else {k: getattr(m, k, None) for k in ("role", "content", "images")}
        if not isinstance(m, dict) and not hasattr(m, "role"):
            raise ArgumentError(f"message {i + 1} is a {type(m).__name__}; give a dict with 'role' and 'content'")
        unknown = sorted(set(d) - {"role", "content", "images"})
        if unknown:
            raise ArgumentError(f"message {i + 1} has unknown key(s) {unknown}; use role, content and images")
        if d.get("role") not in ("user", "assistant"):
            raise ArgumentError(f"message {i + 1} has role {d.get('role')!r}; use 'user' or 'assistant'")
        out.append({"role": d["role"], "content": check_text(d.get("content"), f"message {i + 1} content"),
                    "images": tuple(check_images(d.get("images")))})
    return out

