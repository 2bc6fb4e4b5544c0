"""Chat-template rendering: text runs, ``<image>`` placeholders, answer spans, errors."""

from __future__ import annotations

import pytest

from vlmexport.core.layout import ImagePiece, TextPiece
from vlmexport.core.prompt import IMAGE_TOKEN, ChatTemplate, PromptError, Turn, render
from vlmexport.models import architectures


class CharTokenizer:
    """One id per character (+100), with SentencePiece's habit of a prefix marker per call."""

    bos_id, eos_id = 1, 2
    PREFIX = 3

    def encode(self, text: str) -> list[int]:
        return [self.PREFIX] + [100 + ord(c) for c in text] if text else []


def ids(text: str) -> tuple[int, ...]:
    return tuple(CharTokenizer().encode(text))


T = CharTokenizer()
IMG = 5  # chunk length used below


def test_single_turn_with_placeholder():
    r = render(ChatTemplate(), [Turn(user="<image>What is it?", images=1)], T, IMG)
    assert r.pieces == (TextPiece((1,)), TextPiece(ids("Question: ")), ImagePiece(IMG),
                        TextPiece(ids("What is it? Answer:")))
    assert r.length == 1 + len(ids("Question: ")) + IMG + len(ids("What is it? Answer:"))
    assert r.answer_spans == ()


def test_images_without_placeholder_go_right_after_bos():
    r = render(ChatTemplate(), [Turn(user="Describe both.", images=2)], T, IMG)
    assert r.pieces[:3] == (TextPiece((1,)), ImagePiece(IMG), ImagePiece(IMG))
    assert r.pieces[3] == TextPiece(ids("Question: Describe both. Answer:"))


def test_placeholders_place_each_image_and_whitespace_runs_are_dropped():
    r = render(ChatTemplate(), [Turn(user="<image> <image> Same?", images=2)], T, IMG)
    kinds = [type(p).__name__ for p in r.pieces]
    # "Question: " | img | " " (dropped) | img | " Same? Answer:"
    assert kinds == ["TextPiece", "TextPiece", "ImagePiece", "ImagePiece", "TextPiece"]
    assert r.pieces[-1] == TextPiece(ids(" Same? Answer:"))


def test_multi_turn_answers_and_spans():
    tmpl = ChatTemplate()
    turns = [Turn(user="<image>Colour?", images=1, answer="red"), Turn(user="Shape?")]
    r = render(tmpl, turns, T, IMG)
    flat: list = []
    for p in r.pieces:
        flat += ["IMG"] * p.length if isinstance(p, ImagePiece) else list(p.ids)
    assert len(flat) == r.length
    expected = ([1] + list(ids("Question: ")) + ["IMG"] * IMG + list(ids("Colour? Answer:"))
                + list(ids(" red")) + [2] + list(ids("\nQuestion: Shape? Answer:")))
    assert flat == expected
    # the answer span covers the answer text and its eos, nothing else
    (start, end), = r.answer_spans
    assert flat[start:end] == list(ids(" red")) + [2]


def test_template_switches():
    tmpl = ChatTemplate(add_bos=False, eos_after_answer=False, user="Q: {content}", assistant=" A: {content}",
                        turn_separator=" | ")
    r = render(tmpl, [Turn(user="a", answer="b"), Turn(user="c")], T, IMG)
    assert r.pieces == (TextPiece(ids("Q: a")), TextPiece(ids(" A: b")), TextPiece(ids(" | Q: c")))
    assert r.answer_spans == ((len(ids("Q: a")), len(ids("Q: a")) + len(ids(" A: b"))),)


def test_custom_image_token():
    tmpl = ChatTemplate(image_token="[IMG]")
    r = render(tmpl, [Turn(user="[IMG] and <image>", images=1)], T, IMG)
    assert sum(isinstance(p, ImagePiece) for p in r.pieces) == 1
    assert TextPiece(ids(" and <image> Answer:")) in r.pieces


@pytest.mark.parametrize("turns, match", [
    ([], "empty"),
    ([Turn(user="<image><image>", images=1)], r"2 <image> placeholder\(s\) but 1 image"),
    ([Turn(user="<image>", images=3)], r"1 <image> placeholder\(s\) but 3 image"),
    ([Turn(user="a", answer="b"), Turn(user="look", images=1)], "no <image> placeholder in turn 2"),
    ([Turn(user="a"), Turn(user="b")], "turn 1 has no answer"),
])
def test_render_errors(turns, match):
    with pytest.raises(PromptError, match=match):
        render(ChatTemplate(), turns, T, IMG)


def test_unplaced_images_can_be_refused():
    with pytest.raises(PromptError, match="placeholder"):
        render(ChatTemplate(unplaced_images="error"), [Turn(user="hi", images=1)], T, IMG)


def test_placeholder_without_image_is_an_error():
    # a literal <image> with zero images would silently eat an image slot otherwise
    with pytest.raises(PromptError):
        render(ChatTemplate(), [Turn(user="what is <image>?", images=0)], T, IMG)


def test_template_dict_round_trip_ignores_unknown_keys():
    tmpl = ChatTemplate(user="U: {content}", turn_separator="\n\n", unplaced_images="error")
    d = tmpl.to_dict()
    assert ChatTemplate.from_dict(d) == tmpl
    assert ChatTemplate.from_dict({**d, "jinja": "{{ nope }}"}) == tmpl


def test_prompt_error_is_a_vlmexport_error():
    from vlmexport.core.errors import VlmexportError

    assert issubclass(PromptError, VlmexportError)


@pytest.mark.parametrize("arch", sorted(architectures()))
def test_default_templates_render_with_the_real_tokenizer(arch, tokenizer):
    tmpl = architectures()[arch].default_chat_template()
    assert "{content}" in tmpl.user
    r = render(tmpl, [Turn(user=f"{IMAGE_TOKEN}\nWhat colour is the circle?", images=1, answer="red"),
                      Turn(user="How many?")], tokenizer, 7)
    assert r.pieces[0] == TextPiece((tokenizer.bos_id,))
    assert sum(p.length for p in r.pieces if isinstance(p, ImagePiece)) == 7
    (start, end), = r.answer_spans
    flat: list[int] = []
    for p in r.pieces:
        flat += [-1] * p.length if isinstance(p, ImagePiece) else list(p.ids)
    assert flat[end - 1] == tokenizer.eos_id
    assert tokenizer.decode(flat[start:end - 1]).strip() == "red"
