"""Prompt templating, written once for training and every backend.

A chat template is the model's own jinja template (``chat_template.jinja``, the
``chat_template`` of ``chat_template.json``, ``processor_config.json`` or
``tokenizer_config.json``), rendered as transformers renders it: jinja2's
``ImmutableSandboxedEnvironment`` with ``trim_blocks``/``lstrip_blocks``, the loop-controls
extension, ``{% generation %}`` blocks, ``raise_exception``, ``tojson``, ``strftime_now`` and
the tokenizer's special tokens as variables. Messages are transformers' multimodal form:
``{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}``.

``render`` turns a conversation into layout pieces (text token runs and image chunks): the
rendered text is tokenized in one go (``Tokenizer.encode_prompt``), each image placeholder
the template wrote becomes one image chunk, as a transformers processor expands it. For
training it also returns the token spans of the answers (the ``{% generation %}`` blocks, or
what each answer adds to the rendered text when the template has none).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any, Callable, Sequence

from .errors import VlmexportError
from .layout import ImagePiece, Piece, TextPiece

IMAGE_TOKEN = "<image>"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
_GEN_OPEN, _GEN_CLOSE = "\ue000", "\ue001"  # private-use marks around {% generation %} output


class PromptError(VlmexportError):
    """A prompt does not fit the images or the context."""


class TemplateError(VlmexportError):
    """A chat template does not compile or raised while rendering."""


@dataclass(frozen=True)
class ChatTemplate:
    """A jinja chat template and how its text becomes token ids.

    ``image_token``: what the template writes for an image (the processor's image token);
    ``<image>`` in a user's text is a placeholder for it. ``content_format``: ``"list"``
    (transformers' multimodal content items) or ``"string"`` (message content is text, with the
    image tokens in it). ``encode_runs_apart``: every text run between image/special tokens
    is tokenized as a text of its own (THUDM's CogVLM encodes the text apart from its images);
    otherwise the whole prompt is tokenized at once, as a transformers processor does."""

    jinja: str
    image_token: str = IMAGE_TOKEN
    content_format: str = ""  # "" -> detected from the template
    encode_runs_apart: bool = False
    source: str = ""  # where the template came from (a file name or "vlmexport:<family>")
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.jinja, str) or not self.jinja.strip():
            raise TemplateError("the chat template is empty; give the model a chat_template.jinja")
        if not self.content_format:
            object.__setattr__(self, "content_format", detect_content_format(self.jinja))
        if self.content_format not in ("list", "string"):
            raise TemplateError(f"chat template content_format {self.content_format!r} is unknown; use 'list' or "
                                "'string'")
        compile_template(self.jinja)  # a broken template fails where it is read, not at the first prompt

    def settings(self) -> dict[str, Any]:
        """Everything but the jinja text: the manifest's ``chat_template`` section."""
        return {"image_token": self.image_token, "content_format": self.content_format,
                "encode_runs_apart": self.encode_runs_apart, "source": self.source}

    def to_dict(self) -> dict[str, Any]:
        return {"jinja": self.jinja, **self.settings()}

    @classmethod
    def from_dict(cls, d: dict[str, Any], read: Callable[[str], str] | None = None) -> "ChatTemplate":
        """From ``to_dict`` output, a manifest section (``file`` read with ``read``) or the
        schema older vlmexport versions wrote (``user``/``assistant`` format strings)."""
        if "jinja" in d or "file" in d and "user" not in d:
            jinja = d["jinja"] if "jinja" in d else (read(d["file"]) if read else None)
            if jinja is None:
                raise TemplateError(f"the chat template file {d.get('file')} cannot be read here")
            known = ("image_token", "content_format", "encode_runs_apart", "source")
            return cls(jinja=jinja, **{k: d[k] for k in known if k in d})
        return cls.legacy(**{k: v for k, v in d.items() if k in _LEGACY_FIELDS})

    @classmethod
    def legacy(cls, user: str = "Question: {content} Answer:", assistant: str = " {content}",
               turn_separator: str = "\n", add_bos: bool = True, eos_after_answer: bool = True,
               unplaced_images: str = "start", image_token: str = IMAGE_TOKEN) -> "ChatTemplate":
        """The template older vlmexport versions described with format strings, as jinja. With a
        SentencePiece tokenizer in its legacy mode it encodes exactly as they did (each text run
        between images and EOS tokenized on its own): the project's demo model keeps its ids."""
        return cls(jinja=legacy_jinja(user, assistant, turn_separator, add_bos, eos_after_answer, unplaced_images),
                   image_token=image_token, content_format="list", encode_runs_apart=True,
                   source="vlmexport:legacy")


_LEGACY_FIELDS = ("user", "assistant", "turn_separator", "add_bos", "eos_after_answer", "unplaced_images",
                  "image_token")


def detect_content_format(jinja: str) -> str:
    """``list`` when the template reads content items (``['type']``, ``.type``, ``selectattr('type'``)."""
    return "list" if re.search(r"""\[\s*['"]type['"]\s*\]|\.type\b|['"]type['"]""", jinja) else "string"


def _lit(s: str) -> str:
    return "{{ " + json.dumps(s) + " }}" if s else ""


def legacy_jinja(user: str, assistant: str, turn_separator: str, add_bos: bool, eos_after_answer: bool,
                 unplaced_images: str) -> str:
    if user.count("{content}") != 1 or assistant.count("{content}") != 1:
        raise TemplateError("a template's user and assistant formats need exactly one {content} each")
    u0, u1 = user.split("{content}")
    a0, a1 = assistant.split("{content}")
    unplaced = ("{{ '<image>' * ns.images }}" if unplaced_images == "start" else
                "{{ raise_exception(ns.images ~ ' image(s) have no <image> placeholder; put <image> where each "
                "image belongs') }}")
    return (
        "{#- vlmexport's own template: images without a placeholder go right after BOS (first turn only) -#}\n"
        + ("{{- bos_token -}}\n" if add_bos else "")
        + "{%- for m in messages -%}\n"
        "{%- set ns = namespace(text='', images=0) -%}\n"
        "{%- for c in m.content -%}\n"
        "{%- if c.type == 'image' %}{% set ns.images = ns.images + 1 %}{% else %}{% set ns.text = ns.text + c.text %}"
        "{% endif -%}\n"
        "{%- endfor -%}\n"
        "{%- if m.role == 'user' -%}\n"
        "{%- if ns.images and not loop.first %}{{ raise_exception(ns.images ~ ' image(s) have no <image> placeholder "
        "in turn ' ~ ((loop.index0 // 2) + 1) ~ '; put <image> where each image belongs') }}{% endif -%}\n"
        "{%- if ns.images %}" + unplaced + "{% endif -%}\n"
        "{%- if not loop.first %}" + _lit(turn_separator) + "{% endif -%}\n"
        + _lit(u0) + "{{ ns.text }}" + _lit(u1) + "\n"
        "{%- else -%}\n"
        "{% generation %}" + _lit(a0) + "{{ ns.text }}" + _lit(a1)
        + ("{{ eos_token }}" if eos_after_answer else "") + "{% endgeneration %}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
    )


# ------------------------------------------------------------------- jinja
@lru_cache(maxsize=32)
def compile_template(jinja: str):
    """Compile a template in transformers' environment (its settings, filters and globals)."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlocks(Extension):
        """``{% generation %}...{% endgeneration %}``: marks an answer (transformers' AssistantTracker)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            return _GEN_OPEN + caller() + _GEN_CLOSE

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):  # noqa: N805 (jinja's own signature trick)
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            if any(isinstance(k, str) and k.startswith("_") for k in attrs):
                raise jinja2.exceptions.SecurityError("namespace attributes may not start with '_'")
            jinja2.utils.Namespace.__init__(self, attrs)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlocks, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = TemplateNamespace
    try:
        return env.from_string(jinja)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise TemplateError(f"the chat template does not compile (line {exc.lineno}: {exc.message}); fix the "
                            "model's chat_template.jinja") from None


def render_text(template: ChatTemplate, messages: list[dict], add_generation_prompt: bool,
                variables: dict[str, Any]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered prompt and the character spans of its ``{% generation %}`` blocks."""
    import jinja2

    try:
        out = compile_template(template.jinja).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                      tools=None, documents=None, **variables)
    except jinja2.exceptions.TemplateError as exc:
        raise PromptError(f"the chat template refused the conversation: {exc}") from None
    spans, text, start = [], [], 0
    for part in re.split(f"([{_GEN_OPEN}{_GEN_CLOSE}])", out):
        if part == _GEN_OPEN:
            start = sum(map(len, text))
        elif part == _GEN_CLOSE:
            spans.append((start, sum(map(len, text))))
        else:
            text.append(part)
    return "".join(text), spans


# ------------------------------------------------------------------ render
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
    text: str = ""  # the rendered prompt


def messages_for(template: ChatTemplate, turns: Sequence[Turn]) -> list[dict]:
    """Turns as transformers' chat messages. A turn's images without an ``<image>`` placeholder
    come first as image items (the template puts them where it puts images); placeholders stay
    in the text as the template's image token."""
    msgs: list[dict] = []
    for i, turn in enumerate(turns):
        text = turn.user.replace(IMAGE_TOKEN, template.image_token) if template.image_token != IMAGE_TOKEN \
            else turn.user
        placeholders = text.count(template.image_token)
        if placeholders and placeholders != turn.images:
            raise PromptError(
                f"the prompt has {placeholders} {IMAGE_TOKEN} placeholder(s) but {turn.images} image(s) "
                f"were given; use one {IMAGE_TOKEN} per image")
        unplaced = 0 if placeholders else turn.images
        if template.content_format == "list":
            content: Any = [{"type": "image"} for _ in range(unplaced)] + [{"type": "text", "text": text}]
        else:
            content = "".join(template.image_token + "\n" for _ in range(unplaced)) + text
        msgs.append({"role": "user", "content": content})
        if turn.answer is not None:
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": turn.answer}]
                         if template.content_format == "list" else turn.answer})
        elif i != len(turns) - 1:
            raise PromptError(f"turn {i + 1} has no answer; only the last turn may be unanswered")
    return msgs


def render(template: ChatTemplate, turns: Sequence[Turn], tokenizer, image_tokens: int,
           stop_after_answer: bool = True) -> Rendered:
    """Lay out a conversation. ``image_tokens`` is the chunk length of one image.

    A conversation that ends with an answer is a training example: ``stop_after_answer`` adds
    EOS after that answer where the template does not (hub templates such as llava-hf's write
    none), so the model learns to stop, as TRL's SFT trainer does."""
    if not turns:
        raise PromptError("the conversation is empty; pass at least one question")
    msgs = messages_for(template, turns)
    variables = tokenizer.special_tokens_map()
    training = turns[-1].answer is not None
    text, spans = render_text(template, msgs, not training, variables)
    if training:
        if not spans:
            spans = _answer_spans_by_prefix(template, msgs, variables, text)
        eos = variables.get("eos_token")
        if stop_after_answer and eos and not text.rstrip().endswith(eos):  # the last answer must teach the model to stop
            text += eos
            spans[-1:] = [(spans[-1][0], len(text))] if spans else [(len(text) - len(eos), len(text))]
    n_images = sum(t.images for t in turns)
    if text.count(template.image_token) != n_images:
        raise PromptError(f"the chat template placed {text.count(template.image_token)} image(s) but {n_images} were "
                          f"given; use one {IMAGE_TOKEN} per image")
    ids, offsets = tokenizer.encode_prompt(text, (template.image_token,), runs_apart=template.encode_runs_apart)
    pieces: list[Piece] = []
    run: list[int] = []
    starts: list[int] = []  # flattened position of each id
    n = 0
    for t in ids:
        starts.append(n)
        if isinstance(t, str):
            if run:
                pieces.append(TextPiece(tuple(run)))
                run = []
            pieces.append(ImagePiece(image_tokens))
            n += image_tokens
        else:
            run.append(int(t))
            n += 1
    if run:
        pieces.append(TextPiece(tuple(run)))
    answer_spans = []
    for s, e in spans:
        inside = [k for k, (a, b) in enumerate(offsets) if not isinstance(ids[k], str)
                  and (a < e and b > s if b > a else s <= a < e)]
        if inside:
            answer_spans.append((starts[inside[0]], starts[inside[-1]] + 1))
    return Rendered(pieces=tuple(pieces), answer_spans=tuple(answer_spans), length=n, text=text)


def _answer_spans_by_prefix(template: ChatTemplate, msgs: list[dict], variables: dict,
                            full: str) -> list[tuple[int, int]]:
    """Without ``{% generation %}`` blocks: each answer is what it adds to the rendered text."""
    spans = []
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before, _ = render_text(template, msgs[:k], True, variables)
        upto, _ = render_text(template, msgs[:k + 1], False, variables)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise PromptError("the chat template renders a conversation differently from its beginning, so the answers "
                              "cannot be found; add {% generation %} blocks around the answers")
        spans.append((len(before), len(upto)))
    return spans
