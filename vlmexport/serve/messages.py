"""OpenAI chat messages -> the pipeline's conversation (text with ``<image>`` placeholders + images).

Where the images go:
- text that already holds ``<image>`` placeholders keeps them (one per image, as for
  ``vlmexport run --prompt``);
- in the first user message, images given before all of its text go where the chat
  template puts images without a placeholder (CogVLM: right after BOS), exactly as
  ``vlmexport run --image A --prompt TEXT`` places them, so both answer alike;
- otherwise each image part becomes a placeholder at its place among the text parts.

System (and developer) messages have no slot in the model's template: their text is
put before the first user message's text.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..runtimes.pipeline import Message
from .config import ServeConfig
from .errors import BadRequest
from .images import load_image_url
from .schema import ChatMessage, ImagePart, TextPart


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    n_images: int


def image_count(messages: list[ChatMessage]) -> int:
    return sum(isinstance(p, ImagePart) for m in messages for p in m.parts())


def to_conversation(messages: list[ChatMessage], cfg: ServeConfig, image_token: str, max_images: int) -> Conversation:
    """Validate roles and image counts, fetch the images; raises :class:`~vlmexport.serve.errors.APIError`."""
    n = image_count(messages)
    if n > max_images:
        raise BadRequest(f"the request has {n} images but the model takes at most {max_images} (each image takes "
                         "its own share of the context); send fewer images", param="messages",
                         code="too_many_images")
    system = [_text_only(m, i) for i, m in enumerate(messages) if m.role in ("system", "developer")]
    rest = [(i, m) for i, m in enumerate(messages) if m.role not in ("system", "developer")]
    out: list[Message] = []
    first_user = True
    for i, m in rest:
        if m.role == "assistant":
            out.append(Message("assistant", _text_only(m, i)))
            continue
        text, images = _user_content(m, i, cfg, image_token, first_user)
        if first_user and system:
            text = "\n".join(system + [text]) if text else "\n".join(system)
        first_user = False
        out.append(Message("user", text, tuple(images)))
    if not out:
        raise BadRequest("the conversation has no user message; add one", param="messages")
    return Conversation(tuple(out), n)


def _text_only(m: ChatMessage, i: int) -> str:
    parts = m.parts()
    if any(isinstance(p, ImagePart) for p in parts):
        raise BadRequest(f"messages[{i}]: images are only accepted in user messages", param=f"messages[{i}]")
    return " ".join(p.text for p in parts if isinstance(p, TextPart))


def _user_content(m: ChatMessage, i: int, cfg: ServeConfig, image_token: str, first: bool) -> tuple[str, list[bytes]]:
    parts = m.parts()
    images = [load_image_url(p.image_url.url, cfg, f"messages[{i}] image {k + 1}")
              for k, p in enumerate(q for q in parts if isinstance(q, ImagePart))]
    texts = [p.text for p in parts if isinstance(p, TextPart)]
    placeholders = sum(t.count(image_token) for t in texts)
    if placeholders or not images:
        return " ".join(texts), images
    first_text = next((k for k, p in enumerate(parts) if isinstance(p, TextPart)), len(parts))
    all_images_first = all(isinstance(p, ImagePart) for p in parts[:first_text]) and \
        not any(isinstance(p, ImagePart) for p in parts[first_text:])
    if first and all_images_first:
        return " ".join(texts), images  # the template places them (as `vlmexport run` does)
    pieces: list[str] = []
    for p in parts:
        if isinstance(p, ImagePart):
            pieces.append(image_token)
        elif pieces and not pieces[-1].endswith(image_token):
            pieces.append(" " + p.text)
        else:
            pieces.append(p.text)
    return "".join(pieces), images
