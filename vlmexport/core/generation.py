"""The generation loop and sampler, shared by every backend (numpy only).

A backend implements :class:`DecoderSession` (encode images, prefill, decode one
token, reset); this module owns everything else: sampling, stop rules, streaming.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence

import numpy as np

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
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")


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

