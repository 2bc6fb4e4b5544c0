"""Chat templates: jinja rendered as transformers renders it, placeholders, answer spans, errors,
and the project's own (legacy) template encoding exactly as the format-string renderer did."""

from __future__ import annotations

import pytest

from vlmexport.core.layout import ImagePiece, TextPiece
from vlmexport.core.prompt import (
    IMAGE_TOKEN,
    ChatTemplate,
    PromptError,
    TemplateError,
    Turn,
    detect_content_format,
    render,
    render_text,
)
from vlmexport.models import architectures

IMG = 5  # chunk length used below


def flat(r) -> list:
    out: list = []
    for p in r.pieces:
        out += ["IMG"] * p.length if isinstance(p, ImagePiece) else list(p.ids)
    return out


def old_render(turns, tok, user="Question: {content} Answer:", assistant=" {content}", sep="\n"):
    """The format-string renderer vlmexport had before jinja templates (each run encoded alone,
    EOS after each answer, unplaced images right after BOS): the demo model was trained on it."""
    out: list = [tok.bos_id]
    spans = []
    for i, t in enumerate(turns):
        text = user.format(content=t.user)
        if not text.count(IMAGE_TOKEN) and t.images:
            out += ["IMG"] * (IMG * t.images)
        for j, part in enumerate(((sep if i else "") + text).split(IMAGE_TOKEN)):
            if j:
                out += ["IMG"] * IMG
            if part.strip():
                out += tok.encode(part)
        if t.answer is not None:
            start = len(out)
            out += tok.encode(assistant.format(content=t.answer)) + [tok.eos_id]
            spans.append((start, len(out)))
    return out, tuple(spans)


CONVERSATIONS = [
    [Turn("<image>What is it?", 1)],
    [Turn("Describe both.", 2)],
    [Turn("<image> <image> Same?", 2)],
    [Turn("<image> and <image> Question: what is shown?", 2)],
    [Turn("<image>Colour?", 1, "red"), Turn("Shape?")],
    [Turn("What colour is the circle?", 1, "blue"), Turn("How  many\nshapes?", 0, "3"), Turn("Where?")],
    [Turn("Is there a red square?", 1, "yes"), Turn("And a green one?", 0, "no")],
]


@pytest.mark.parametrize("turns", CONVERSATIONS)
def test_legacy_template_encodes_exactly_as_before(turns, tokenizer):
    r = render(ChatTemplate.legacy(), turns, tokenizer, IMG)
    ids, spans = old_render(turns, tokenizer)
    assert flat(r) == ids
    assert r.answer_spans == spans
    assert r.length == len(ids)


def test_legacy_template_from_the_old_schema(tokenizer):
    old = {"user": "Q: {content}", "assistant": " A: {content}", "turn_separator": " | ", "add_bos": True,
           "eos_after_answer": True, "unplaced_images": "start", "image_token": "<image>", "unknown": 1}
    tmpl = ChatTemplate.from_dict(old)
    turns = [Turn("a b", 1, "c"), Turn("d")]
    assert flat(render(tmpl, turns, tokenizer, IMG)) == old_render(turns, tokenizer, "Q: {content}", " A: {content}",
                                                                   " | ")[0]


def test_legacy_refusals(tokenizer):
    with pytest.raises(PromptError, match="no <image> placeholder in turn 2"):
        render(ChatTemplate.legacy(), [Turn("a", answer="b"), Turn("look", images=1)], tokenizer, IMG)
    with pytest.raises(PromptError, match="placeholder"):
        render(ChatTemplate.legacy(unplaced_images="error"), [Turn(user="hi", images=1)], tokenizer, IMG)


@pytest.mark.parametrize("turns, match", [
    ([], "empty"),
    ([Turn(user="<image><image>", images=1)], r"2 <image> placeholder\(s\) but 1 image"),
    ([Turn(user="<image>", images=3)], r"1 <image> placeholder\(s\) but 3 image"),
    ([Turn(user="what is <image>?", images=0)], r"placeholder\(s\) but 0 image"),
    ([Turn(user="a"), Turn(user="b")], "turn 1 has no answer"),
])
def test_render_errors(turns, match, tokenizer):
    with pytest.raises(PromptError, match=match):
        render(ChatTemplate.legacy(), turns, tokenizer, IMG)


# ------------------------------------------------------------------ jinja
def test_rendered_with_transformers_environment(tokenizer):
    """trim_blocks/lstrip_blocks, loop controls, tojson without HTML escaping, namespace."""
    jinja = ("{% for m in messages %}\n  {% if loop.index > 1 %}{% break %}{% endif %}\n"
             "{{ m.content | tojson }}{% set ns = namespace(n=1) %}{{ ns.n }}\n{% endfor %}")
    text, _ = render_text(ChatTemplate(jinja), [{"role": "user", "content": "<a & b>"},
                                               {"role": "user", "content": "x"}], False, {})
    assert text == '"<a & b>"1\n'


def test_template_is_sandboxed():
    tmpl = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(PromptError, match="refused"):
        render_text(tmpl, [], False, {})


def test_raise_exception_is_a_prompt_error(tokenizer):
    tmpl = ChatTemplate("{{ raise_exception('only one image, please') }}")
    with pytest.raises(PromptError, match="only one image, please"):
        render(tmpl, [Turn("hi")], tokenizer, IMG)


def test_broken_template_fails_when_read():
    with pytest.raises(TemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(TemplateError, match="empty"):
        ChatTemplate("  ")


def test_content_format_detection():
    assert detect_content_format("{% for c in m['content'] %}{{ c['type'] }}{% endfor %}") == "list"
    assert detect_content_format("{{ message.content }}") == "string"


def test_string_content_templates_get_image_tokens_in_the_text(tokenizer):
    tmpl = ChatTemplate("{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    r = render(tmpl, [Turn("hi", 1)], tokenizer, IMG)
    assert r.text == "<s>user: <image>\nhi\n"
    assert sum(isinstance(p, ImagePiece) for p in r.pieces) == 1


def test_answer_spans_without_generation_blocks(tokenizer):
    tmpl = ChatTemplate("{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}Q: {{ m.content }}"
                        "{% else %} A: {{ m.content }}{{ eos_token }}{% endif %}{% endfor %}")
    r = render(tmpl, [Turn("a", 0, "red"), Turn("b", 0, "blue")], tokenizer, IMG)
    f = flat(r)
    assert [tokenizer.decode(f[s:e]).strip() for s, e in r.answer_spans] == ["A: red", "A: blue"]
    assert [f[e - 1] for s, e in r.answer_spans] == [tokenizer.eos_id] * 2


def test_training_examples_end_with_eos_when_the_template_writes_none(tokenizer):
    tmpl = architectures()["llava"].default_chat_template()
    r = render(tmpl, [Turn("What colour?", 1, "red")], tokenizer, IMG)
    (_, e), = r.answer_spans
    assert flat(r)[e - 1] == tokenizer.eos_id and r.text.endswith("red </s>")
    r = render(tmpl, [Turn("What colour?", 1, "red")], tokenizer, IMG, stop_after_answer=False)
    assert tokenizer.eos_id not in flat(r)


def test_template_dict_round_trip():
    tmpl = ChatTemplate("{{ messages[0].content }}", image_token="<img>", source="x")
    assert ChatTemplate.from_dict(tmpl.to_dict()) == tmpl
    section = {"file": "chat_template.jinja", **tmpl.settings()}
    assert ChatTemplate.from_dict(section, read=lambda f: tmpl.jinja) == tmpl


def test_custom_image_token(tokenizer):
    tmpl = ChatTemplate("{% for m in messages %}{{ m.content[0].text }}{% endfor %}", image_token="[IMG]",
                        content_format="list")
    r = render(tmpl, [Turn(user="look: <image> now", images=1)], tokenizer, IMG)
    assert r.text == "look: [IMG] now" and sum(isinstance(p, ImagePiece) for p in r.pieces) == 1


def test_prompt_error_is_a_vlmexport_error():
    from vlmexport.core.errors import VlmexportError

    assert issubclass(PromptError, VlmexportError) and issubclass(TemplateError, VlmexportError)


@pytest.mark.parametrize("arch", sorted(architectures()))
def test_default_templates_render_with_the_real_tokenizer(arch, tokenizer):
    tmpl = architectures()[arch].default_chat_template()
    r = render(tmpl, [Turn(user=f"{IMAGE_TOKEN}\nWhat colour is the circle?", images=1, answer="red"),
                      Turn(user="How many?")], tokenizer, 7)
    assert r.pieces[0] == TextPiece((tokenizer.bos_id,)) or r.pieces[0].ids[0] == tokenizer.bos_id
    assert sum(p.length for p in r.pieces if isinstance(p, ImagePiece)) == 7
    (start, end), = r.answer_spans
    assert tokenizer.decode(flat(r)[start:end]).strip() == "red"


@pytest.mark.parametrize("version, text", [
    ("chat", "<s><image>Question: a Answer: b\nQuestion: c Answer:"),
    ("vqa", "<s><image>Question: a Short answer: b\nQuestion: c Short answer:"),
    ("base", "<s><image>c"),
])
def test_cogvlm_template_versions_follow_thudm(version, text, tokenizer):
    """THUDM's _history_to_prompt: base = the query alone; chat/vqa: 'Question: q Answer: a\\n'."""
    from vlmexport.models.cogvlm import CogVLM, CogVLMConfig

    tmpl = CogVLM.default_chat_template(CogVLMConfig.tiny(template_version=version))
    assert render(tmpl, [Turn("a", 1, "b"), Turn("c")], tokenizer, IMG).text == text


def test_cogvlm_unknown_template_version_is_refused():
    from vlmexport.core.errors import ConfigError
    from vlmexport.models.cogvlm import CogVLM, CogVLMConfig

    with pytest.raises(ConfigError, match="template_version 'nope'"):
        CogVLM.default_chat_template(CogVLMConfig.tiny(template_version="nope"))
