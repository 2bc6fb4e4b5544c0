"""The pipeline every backend shares: prompt -> layout -> session -> sampler -> text.

Image preprocessing, templating, sampling and stop rules live here (and in
``vlmexport.core``) once; a backend only implements the :class:`DecoderSession`
protocol of ``vlmexport.core.generation``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import numpy as np

from ..core.generation import DecoderSession, GenerationConfig, generate_tokens, stream_text
from ..core.layout import ImagePiece, SequenceLayout, build_layout
from ..core.preprocess import ImageInput, PreprocessConfig, preprocess
from ..core.prompt import ChatTemplate, PromptError, Turn, render
from ..core.tokenizer import Tokenizer
from .arguments import check_images, check_messages, check_options, check_text
from .spec import ModelSpec


@dataclass(frozen=True)
class Message:
    role: str  # "user" | "assistant"
    content: str
    images: tuple[ImageInput, ...] = ()


class Pipeline:
    def __init__(self, session: DecoderSession, tokenizer: Tokenizer, template: ChatTemplate,
                 preprocess_config: PreprocessConfig, spec: ModelSpec, backend: str = "",
                 defaults: GenerationConfig | None = None):
        self.session = session
        self.tokenizer = tokenizer
        self.template = template
        self.preprocess_config = preprocess_config
        self.spec = spec
        self.backend = backend
        self.defaults = defaults or GenerationConfig(max_new_tokens=64, stop_token_ids=(tokenizer.eos_id,))

    # ------------------------------------------------------------------ layout
    def prepare(self, turns: Sequence[Turn], images: Sequence[ImageInput]) -> tuple[SequenceLayout, np.ndarray | None]:
        rendered = render(self.template, turns, self.tokenizer, self.spec.image_tokens)
        n_chunks = sum(1 for p in rendered.pieces if isinstance(p, ImagePiece))
        if n_chunks != len(images):
            raise PromptError(f"the prompt has room for {n_chunks} image(s) but {len(images)} were given; use one "
                              f"{self.template.image_token} per image")
        layout = build_layout(rendered.pieces, self.spec.expert_routing, self.spec.position_ids,
                              image_pad_id=self.spec.placeholder_id, image_placement=self.spec.image_placement)
        if len(layout) >= self.spec.max_length:
            raise PromptError(f"the prompt takes {len(layout)} positions but the model's context holds "
                              f"{self.spec.max_length}; shorten the prompt or use fewer images")
        pixels = None
        if images:
            pixels = np.stack([preprocess(img, self.preprocess_config, name=_name(img, i))
                               for i, img in enumerate(images)])
        return layout, pixels

    def _run(self, turns: Sequence[Turn], images: Sequence[ImageInput], config: GenerationConfig) -> Iterator[int]:
        layout, pixels = self.prepare(turns, images)
        embeds = self.session.encode_images(pixels) if pixels is not None else None
        return generate_tokens(self.session, layout, embeds, config)

    def _config(self, **overrides) -> GenerationConfig:
        overrides = {k: v for k, v in check_options(overrides).items() if v is not None}
        if "stop_token_ids" not in overrides:
            overrides["stop_token_ids"] = self.defaults.stop_token_ids or (self.tokenizer.eos_id,)
        return replace(self.defaults, **overrides)

    # -------------------------------------------------------------- public API
    def generate(self, prompt: str, images: Sequence[ImageInput] = (), **gen) -> str:
        """Answer one prompt. ``prompt`` may hold ``<image>`` placeholders, one per image."""
        return "".join(self.stream(prompt, images, **gen))

    def stream(self, prompt: str, images: Sequence[ImageInput] = (), **gen) -> Iterator[str]:
        prompt, images = check_text(prompt), check_images(images)
        cfg = self._config(**gen)
        turns = [Turn(user=prompt, images=len(images))]
        return stream_text(self._run(turns, images, cfg), self.tokenizer, cfg.stop_strings)

    def chat(self, messages: Sequence[Message | dict], **gen) -> str:
        """Multi-turn: alternating user/assistant messages ending with a user message."""
        turns, images = chat_turns(messages)
        cfg = self._config(**gen)
        return "".join(stream_text(self._run(turns, images, cfg), self.tokenizer, cfg.stop_strings))

    def generation_config(self, **gen) -> GenerationConfig:
        """The pipeline's defaults with ``gen`` (None values ignored) applied, as ``generate`` uses them."""
        return self._config(**gen)


def chat_turns(messages: Sequence[Message | dict]) -> tuple[list[Turn], list[ImageInput]]:
    """Alternating user/assistant messages (ending with a user message) -> template turns and their images."""
    msgs = [Message(m["role"], m["content"], m["images"]) for m in check_messages(messages)]
    turns: list[Turn] = []
    images: list[ImageInput] = []
    i = 0
    while i < len(msgs):
        if msgs[i].role != "user":
            raise PromptError(f"message {i + 1} should come from the user; alternate user and assistant")
        answer = None
        if i + 1 < len(msgs):
            if msgs[i + 1].role != "assistant":
                raise PromptError(f"message {i + 2} should come from the assistant; alternate user and assistant")
            answer = msgs[i + 1].content
        turns.append(Turn(user=msgs[i].content, images=len(msgs[i].images), answer=answer))
        images.extend(msgs[i].images)
        i += 2
    if not turns:
        raise PromptError("the conversation is empty; pass at least one user message")
    if turns[-1].answer is not None:
        raise PromptError("the conversation ends with an assistant message; end with the user's question")
    return turns, images


def _name(img: ImageInput, i: int) -> str:
    return str(img) if isinstance(img, (str,)) or hasattr(img, "__fspath__") else f"image {i + 1}"
