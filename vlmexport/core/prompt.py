"""Prompt templating, written once for training and every backend.

A conversation is a list of turns; each user turn is text with ``<image>`` placeholders
and the images that fill them. ``render`` turns it into layout pieces (text token runs
and image chunks) and, for training, the positions whose tokens are supervised.

Each text run is tokenized on its own (SentencePiece adds its dummy-prefix "▁" to
each call), exactly as at training time; backends never re-tokenize.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

from .errors import VlmexportError
from .layout import ImagePiece, Piece, TextPiece

IMAGE_TOKEN = "<image>"


class PromptError(VlmexportError):
    """A prompt does not fit the images or the context."""


@dataclass(frozen=True)
class ChatTemplate:
    """THUDM CogVLM's chat template by default: ``Question: {q} Answer: {a}`` per turn."""

    user: str = "Question: {content} Answer:"
    assistant: str = " {content}"
    turn_separator: str = "\n"
    add_bos: bool = True
    eos_after_answer: bool = True
    # where images without a placeholder go: "start" (right after BOS, as CogVLM) or "error"
    unplaced_images: str = "start"
    image_token: str = IMAGE_TOKEN

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ChatTemplate":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class Turn:
    user: str
    images: int = 0  # how many images this turn carries
    answer: str | None = None  # None: the turn the model answers now


@dataclass(frozen=True)
class Rendered:
    pieces: tuple[Piece, ...]
    # for training: (start, end) token spans inside the flattened sequence that are answers (+eos)
    answer_spans: tuple[tuple[int, int], ...]
    length: int


def render(template: ChatTemplate, turns: Sequence[Turn], tokenizer, image_tokens: int) -> Rendered:
    """Lay out a conversation. ``image_tokens`` is the chunk length of one image."""
    if not turns:
        raise PromptError("the conversation is empty; pass at least one question")
    pieces: list[Piece] = []
    spans: list[tuple[int, int]] = []
    n = 0

    def add_text(text: str, ids: list[int] | None = None) -> None:
        nonlocal n
        ids = tokenizer.encode(text) if ids is None else ids
        if ids:
            pieces.append(TextPiece(tuple(ids)))
            n += len(ids)

    def add_image() -> None:
        nonlocal n
        pieces.append(ImagePiece(image_tokens))
        n += image_tokens

    if template.add_bos:
        add_text("", [tokenizer.bos_id])
    for i, turn in enumerate(turns):
        text = template.user.format(content=turn.user)
        placeholders = text.count(template.image_token)
        if placeholders and placeholders != turn.images:
            raise PromptError(
                f"the prompt has {placeholders} {template.image_token} placeholder(s) but {turn.images} image(s) "
                f"were given; use one {template.image_token} per image"
            )
        if not placeholders and turn.images:
            if template.unplaced_images != "start" or i != 0:
                raise PromptError(
                    f"{turn.images} image(s) have no {template.image_token} placeholder in turn {i + 1}; "
                    f"put {template.image_token} where each image belongs"
                )
            for _ in range(turn.images):
                add_image()
        sep = template.turn_separator if i else ""
        parts = (sep + text).split(template.image_token)
        for j, part in enumerate(parts):
            if j:
                add_image()
            if part.strip():
                add_text(part)
        if turn.answer is not None:
            start = n
            add_text(template.assistant.format(content=turn.answer))
            if template.eos_after_answer:
                add_text("", [tokenizer.eos_id])
            spans.append((start, n))
        elif i != len(turns) - 1:
            raise PromptError(f"turn {i + 1} has no answer; only the last turn may be unanswered")
    return Rendered(pieces=tuple(pieces), answer_spans=tuple(spans), length=n)
