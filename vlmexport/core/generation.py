"""The generation loop and sampler, shared by every backend (numpy only).

A backend implements :class:`DecoderSession` (encode images, prefill, decode one
token, reset); this module owns everything else: sampling, stop rules, streaming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence

import numpy as np

from .errors import VlmexportError
from .layout import SequenceLayout


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", _int_tuple(self.stop_token_ids, "stop_token_ids"))
        object.__setattr__(self, "stop_strings", _str_tuple(self.stop_strings))
        _count(self.max_new_tokens, "max_new_tokens", MAX_NEW_TOKENS, "the number of tokens to generate, e.g. 64")
        _count(self.top_k, "top_k", None, "0 (off) or how many likely tokens to sample from, e.g. 40")
        if self.seed is not None:
            _count(self.seed, "seed", 2**63 - 1, "a non-negative integer, or leave it out")
        if not _real(self.temperature) or self.temperature < 0:
            raise GenerationError(f"temperature {self.temperature!r} must be a finite number >= 0 (0 = greedy), "
                                  "e.g. 0.7")
        if not _real(self.top_p) or not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p {self.top_p!r} must be in (0, 1] (1 = off), e.g. 0.9")


MAX_NEW_TOKENS = 1 << 20  # far above any context; a larger request is a typo


class GenerationError(VlmexportError, ValueError):
    """A sampling or stopping value is out of range or of the wrong type (a ValueError too)."""


def _real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def _count(x, name: str, most: int | None, example: str) -> None:
    if not isinstance(x, (int, np.integer)) or isinstance(x, bool) or x < 0 or (most is not None and x > most):
        bound = f" and at most {most:,}" if most is not None else ""
        raise GenerationError(f"{name} {x!r} must be a whole number >= 0{bound}: {example}")


def _int_tuple(x, name: str) -> tuple[int, ...]:
    if isinstance(x, (str, bytes)) or not isinstance(x, (list, tuple, set, frozenset)):
        raise GenerationError(f"{name} {x!r} must be a list of token ids")
    for t in x:
        _count(t, name[:-1], None, "a token id of the vocabulary")
    return tuple(int(t) for t in x)


def _str_tuple(x) -> tuple[str, ...]:
    if isinstance(x, str) or not isinstance(x, (list, tuple)) or not all(isinstance(s, str) for s in x):
        raise GenerationError(f"stop_strings {x!r} must be a list of strings, e.g. ['###']")
    return tuple(x)


class DecoderSession(Protocol):
    """What a backend provides. Arrays are numpy; logits are float32 [vocab]."""

    max_length: int

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """[N, 3, H, W] float32 -> image embeddings [N, T, hidden]."""

    def prefill(self, layout: SequenceLayout, image_embeds: np.ndarray | None) -> np.ndarray:
        """Run the whole prompt; returns the logits of its last position."""

    def decode(self, token: int, position: int) -> np.ndarray:
        """Append one text token at ``position``; returns its logits."""

    def reset(self) -> None:
        """Forget the cached prompt."""


@dataclass
class Sampler:
    config: GenerationConfig
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.config.seed)

    def __call__(self, logits: np.ndarray) -> int:
        c = self.config
        logits = np.asarray(logits, dtype=np.float64).reshape(-1)
        if c.temperature == 0:
            return int(np.argmax(logits))
        logits = logits / c.temperature
        if c.top_k and c.top_k < logits.size:
            kth = np.partition(logits, -c.top_k)[-c.top_k]
            logits = np.where(logits < kth, -np.inf, logits)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if c.top_p < 1.0:
            order = np.argsort(-probs)
            cum = np.cumsum(probs[order])
            keep = cum - probs[order] < c.top_p  # smallest set whose mass reaches top_p
            mask = np.zeros_like(probs, dtype=bool)
            mask[order[keep]] = True
            probs = np.where(mask, probs, 0.0)
            probs /= probs.sum()
        return int(self.rng.choice(probs.size, p=probs))


def generate_tokens(session: DecoderSession, layout: SequenceLayout, image_embeds: np.ndarray | None,
                    config: GenerationConfig) -> Iterator[int]:
    """Yield generated token ids until a stop token, ``max_new_tokens`` or the context end.

    Stop tokens are not yielded. Stop strings are applied by the caller on decoded text
    (:func:`stream_text`), since they can span tokens.
    """
    if config.max_new_tokens == 0:
        return
    sampler = Sampler(config)
    session.reset()
    logits = session.prefill(layout, image_embeds)
    position = layout.next_position
    length = len(layout)
    stops = set(config.stop_token_ids)
    for i in range(config.max_new_tokens):
        token = sampler(logits)
        if token in stops:
            return
        yield token
        if i + 1 == config.max_new_tokens or length >= session.max_length:
            return
        logits = session.decode(token, position)
        position += 1
        length += 1


def stream_text(tokens: Iterator[int], tokenizer, stop_strings: Sequence[str] = ()) -> Iterator[str]:
    """Turn token ids into text deltas, holding back bytes of an unfinished UTF-8 character
    and cutting at the first stop string."""
    text = TextStream(tokenizer, stop_strings)
    for tok in tokens:
        piece = text.push(tok)
        if piece:
            yield piece
        if text.stopped:
            return
    piece = text.finish()
    if piece:
        yield piece


class TextStream:
    """:func:`stream_text` one token at a time (for callers that are handed tokens, e.g. a batch)."""

    def __init__(self, tokenizer, stop_strings: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False  # a stop string was reached: push nothing more

    def push(self, tok: int) -> str:
        self.ids.append(tok)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        cut = _first_stop(text, self.stop_strings)
        if cut is not None:
            self.stopped = True
            return self._emit(text[:cut])
        # hold back a tail that could be the start of a stop string
        hold = max((len(s) - 1 for s in self.stop_strings), default=0)
        return self._emit(text[:len(text) - hold] if hold else text)

    def finish(self) -> str:
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids)
        cut = _first_stop(text, self.stop_strings)
        return self._emit(text if cut is None else text[:cut])

    def _emit(self, upto: str) -> str:
        if len(upto) <= len(self.emitted):
            return ""
        piece = upto[len(self.emitted):]
        self.emitted = upto
        return piece


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None

