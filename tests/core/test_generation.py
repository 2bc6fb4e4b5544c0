"""Sampler, generation loop, streaming and stop rules, through the torch pipeline.

The reference for greedy decoding is argmax over the logits of a full recompute
(``model.forward`` on the whole sequence at every step), not the KV-cached session.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmexport.core.generation import GenerationConfig, Sampler, generate_tokens, stream_text
from vlmexport.core.layout import TextPiece, build_layout
from vlmexport.core.preprocess import preprocess
from vlmexport.core.prompt import PromptError, Turn, render
from vlmexport.models import architectures, get_architecture
from vlmexport.runtimes.pipeline import Message
from vlmexport.runtimes.torch_backend import pipeline_from_model

ARCHS = sorted(architectures())
PROMPT = "<image> What colour is <image>?"
N = 8  # max_new_tokens for most tests (a tiny random model never stops by itself)


@pytest.fixture(scope="module", params=ARCHS)
def pipe(request, tiny_model, tokenizer, preprocess_config):
    model = tiny_model(request.param, seed=11, jitter=True)
    return pipeline_from_model(model, tokenizer, preprocess_config)


@pytest.fixture(scope="module")
def imgs(images):
    return images[:2]


def template_family(pipe, table: dict):
    """``table``'s entry for the model's architecture, or for the architecture whose chat template it
    reuses (an architecture built on another's decoder may keep its template)."""
    arch = type(pipe.session.model).arch_name
    if arch in table:
        return table[arch]
    same = [a for a in table if get_architecture(a).default_chat_template().jinja == pipe.template.jinja]
    assert same, f"{arch}: no expected rendering for its chat template"
    return table[same[0]]


def greedy_by_hand(pipe, pieces, images, n: int, stops=()) -> list[int]:
    model, c = pipe.session.model, pipe.session.model.config
    px = torch.from_numpy(np.stack([preprocess(i, pipe.preprocess_config) for i in images])) if images else None
    out: list[int] = []
    for _ in range(n):
        lay = build_layout(list(pieces) + ([TextPiece(tuple(out))] if out else []), c.expert_routing, c.position_ids,
                           image_pad_id=model.image_placeholder_id(), image_placement=model.image_placement)
        with torch.no_grad():
            logits = model(torch.as_tensor(lay.input_ids)[None], torch.as_tensor(lay.position_ids)[None],
                           torch.as_tensor(lay.token_type)[None], torch.as_tensor(lay.is_image)[None], px)
        tok = int(torch.argmax(logits[0, -1]))
        if tok in stops:
            break
        out.append(tok)
    return out


def prompt_pieces(pipe, prompt=PROMPT, n_images=2):
    return render(pipe.template, [Turn(user=prompt, images=n_images)], pipe.tokenizer,
                  pipe.session.model.image_tokens()).pieces


def tokens(pipe, images, prompt=PROMPT, **gen) -> list[int]:
    layout, px = pipe.prepare([Turn(user=prompt, images=len(images))], images)
    embeds = pipe.session.encode_images(px) if px is not None else None
    cfg = GenerationConfig(**{"max_new_tokens": N, **gen})
    return list(generate_tokens(pipe.session, layout, embeds, cfg))


# ------------------------------------------------------------------- greedy
def test_greedy_equals_argmax_by_hand(pipe, imgs):
    expected = greedy_by_hand(pipe, prompt_pieces(pipe), imgs, N)
    assert len(expected) == N
    assert tokens(pipe, imgs) == expected
    text = pipe.generate(PROMPT, imgs, max_new_tokens=N, stop_token_ids=())
    assert text == pipe.tokenizer.decode(expected)


def test_greedy_text_only(pipe):
    expected = greedy_by_hand(pipe, prompt_pieces(pipe, "Is there a red circle?", 0), [], 5)
    assert tokens(pipe, [], prompt="Is there a red circle?", max_new_tokens=5) == expected


def test_stop_token_stops_and_is_not_yielded(pipe, imgs):
    free = tokens(pipe, imgs)
    stop = free[3]
    cut = free.index(stop)
    assert tokens(pipe, imgs, stop_token_ids=(stop,)) == free[:cut]
    assert tokens(pipe, imgs, stop_token_ids=(free[0],)) == []
    text = pipe.generate(PROMPT, imgs, max_new_tokens=N, stop_token_ids=(stop,))
    assert text == pipe.tokenizer.decode(free[:cut])


def test_eos_is_the_default_stop_token(pipe):
    assert pipe.defaults.stop_token_ids == (pipe.tokenizer.eos_id,)


@pytest.mark.parametrize("n", [0, 1, 3, N])
def test_max_new_tokens(pipe, imgs, n):
    out = tokens(pipe, imgs, max_new_tokens=n)
    assert len(out) == n
    assert out == tokens(pipe, imgs)[:n]


def test_generation_stops_at_the_end_of_the_context(pipe, imgs, tokenizer, preprocess_config):
    layout, _ = pipe.prepare([Turn(user=PROMPT, images=2)], imgs)
    short = pipeline_from_model(pipe.session.model, tokenizer, preprocess_config, max_length=len(layout) + 2)
    out = tokens(short, imgs, max_new_tokens=50)
    # positions len(layout) .. max_length-1 are decoded; the token sampled from the last one is yielded too
    assert out == tokens(pipe, imgs)[:3]


# ----------------------------------------------------------------- sampling
def test_sampling_is_reproducible_with_a_seed(pipe, imgs):
    a = tokens(pipe, imgs, temperature=1.0, seed=5)
    assert a == tokens(pipe, imgs, temperature=1.0, seed=5)
    assert a != tokens(pipe, imgs, temperature=1.0, seed=6)
    assert a != tokens(pipe, imgs)  # and it is not greedy
    assert (pipe.generate(PROMPT, imgs, max_new_tokens=N, temperature=1.0, seed=5, stop_token_ids=())
            == pipe.tokenizer.decode(a))


def test_top_k_1_and_tiny_top_p_are_greedy(pipe, imgs):
    greedy = tokens(pipe, imgs)
    assert tokens(pipe, imgs, temperature=1.5, top_k=1, seed=0) == greedy
    assert tokens(pipe, imgs, temperature=1.5, top_p=1e-9, seed=0) == greedy


def test_sampler_top_k_and_top_p_restrict_the_support():
    logits = np.log(np.array([0.05, 0.5, 0.3, 0.15]))

    def draws(**kw):
        return {Sampler(GenerationConfig(temperature=1.0, seed=s, **kw))(logits) for s in range(200)}

    assert draws(top_k=2) == {1, 2}
    assert draws(top_p=0.6) == {1, 2}  # 0.5 < 0.6, so the 0.3 token is needed to reach it
    assert draws(top_p=0.45) == {1}  # 0.5 alone is enough
    assert draws(top_p=0.81) == {1, 2, 3}
    assert draws() == {0, 1, 2, 3}
    assert Sampler(GenerationConfig())(logits) == 1
    # a temperature close to 0 behaves like greedy
    assert {Sampler(GenerationConfig(temperature=1e-6, seed=s))(logits) for s in range(50)} == {1}


def test_sampler_frequencies_follow_the_distribution():
    probs = np.array([0.1, 0.2, 0.7])
    s = Sampler(GenerationConfig(temperature=1.0, seed=0))
    counts = np.bincount([s(np.log(probs)) for _ in range(3000)], minlength=3) / 3000
    np.testing.assert_allclose(counts, probs, atol=0.03)
    # temperature 0.5 squares the probabilities (then renormalises)
    s = Sampler(GenerationConfig(temperature=0.5, seed=1))
    counts = np.bincount([s(np.log(probs)) for _ in range(3000)], minlength=3) / 3000
    np.testing.assert_allclose(counts, probs ** 2 / (probs ** 2).sum(), atol=0.03)


@pytest.mark.parametrize("bad", [dict(max_new_tokens=-1), dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(top_k=-1)])
def test_generation_config_validation(bad):
    with pytest.raises(ValueError):
        GenerationConfig(**bad)


# -------------------------------------------------------------- streaming
def test_stream_concatenates_to_generate(pipe, imgs):
    for gen in (dict(), dict(temperature=1.0, seed=3)):
        pieces = list(pipe.stream(PROMPT, imgs, max_new_tokens=N, stop_token_ids=(), **gen))
        assert "".join(pieces) == pipe.generate(PROMPT, imgs, max_new_tokens=N, stop_token_ids=(), **gen)
        assert all(pieces)


def test_stop_strings_cut_the_text(pipe, imgs):
    full = pipe.generate(PROMPT, imgs, max_new_tokens=12, stop_token_ids=())
    # two characters, one of them visible, that first occur after the start (so some text comes before);
    # a random tiny model may repeat control characters ('\x0cZ\x0cZ...'), which a stop string may hold
    i = next((i for i in range(1, len(full) - 1) if "\ufffd" not in full[i:i + 2]
              and any(c.isprintable() and not c.isspace() for c in full[i:i + 2]) and full.find(full[i:i + 2]) > 0),
             None)
    assert i is not None, f"no usable stop string in {full!r}"
    stop = full[i:i + 2]
    expected = full[:full.find(stop)]
    assert pipe.generate(PROMPT, imgs, max_new_tokens=12, stop_token_ids=(), stop_strings=(stop,)) == expected
    streamed = list(pipe.stream(PROMPT, imgs, max_new_tokens=12, stop_token_ids=(), stop_strings=("\x00\x01", stop)))
    assert "".join(streamed) == expected
    assert all(stop not in piece for piece in streamed)


class FakeTokenizer:
    """Each id is one string; ids >= 100 are the halves of a two-id character."""

    vocab = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "!", 6: " E", 7: "ND", 8: " more"}

    def decode(self, ids):
        out, pending = "", None
        for i in ids:
            if i >= 100:
                if pending is None:
                    pending = i
                    continue
                out += "é"
                pending = None
            else:
                out += self.vocab[i]
        return out + ("\ufffd" if pending is not None else "")


def test_stream_text_holds_back_possible_stop_prefixes():
    tok = FakeTokenizer()
    pieces = list(stream_text(iter([1, 2, 3, 4, 6, 7, 8]), tok, stop_strings=(" END",)))
    assert "".join(pieces) == "Hello world"
    assert len(pieces) > 1  # it does stream
    # without a stop string everything comes out, incrementally, one piece per token
    pieces = list(stream_text(iter([1, 2, 3, 4, 5]), tok))
    assert pieces == ["Hel", "lo", " wor", "ld", "!"]


def test_stream_text_never_emits_half_characters():
    tok = FakeTokenizer()
    pieces = list(stream_text(iter([1, 100, 101, 5, 100]), tok))
    assert pieces == ["Hel", "é", "!", "\ufffd"]  # a dangling half at the very end is flushed as is
    assert list(stream_text(iter([]), tok)) == []


def test_stream_text_with_the_real_tokenizer(tokenizer):
    text = "the red circle is left of 42 and café € ok"
    ids = tokenizer.encode(text)
    pieces = list(stream_text(iter(ids), tokenizer))
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) > 5
    cut = list(stream_text(iter(ids), tokenizer, stop_strings=("café",)))
    assert "".join(cut) == "the red circle is left of 42 and "


# -------------------------------------------------------------------- chat
def test_chat_renders_the_history_with_answers(pipe, imgs):
    t, tok = pipe.template, pipe.tokenizer
    n = pipe.session.model.image_tokens()
    seen = []
    original = pipe.session.prefill

    def recording_prefill(layout, embeds):
        seen.append(layout)
        return original(layout, embeds)

    pipe.session.prefill = recording_prefill
    try:
        answer = pipe.chat([{"role": "user", "content": "<image>What colour?", "images": [imgs[0]]},
                            {"role": "assistant", "content": "red"},
                            Message("user", "And the shape?")], max_new_tokens=4, stop_token_ids=())
    finally:
        del pipe.session.prefill
    (layout,) = seen
    # the history goes through the family's own template (THUDM's for cogvlm, llava-hf's for llava):
    # answers in the text, no EOS between turns, the text tokenized as the template says
    expected_text = template_family(pipe, {
        "cogvlm": "<s>Question: <image>What colour? Answer: red\nQuestion: And the shape? Answer:",
        "llava": "USER: <image>What colour? ASSISTANT: red USER: And the shape? ASSISTANT:",
        "blip2": "<s>Question: <image>What colour? Answer: red Question: And the shape? Answer:",
        "flamingo": "User: <image>What colour?\nAssistant: red\nUser: And the shape?\nAssistant:",
        # ChatML: every turn ends with the tokenizer's EOS (<|im_end|> in InternVL's own tokenizer)
        "internvl": "<|im_start|>user\n<img><IMG_CONTEXT></img>What colour?</s>\n<|im_start|>assistant\nred</s>\n"
                    "<|im_start|>user\nAnd the shape?</s>\n<|im_start|>assistant\n",
    })
    ids, _ = tok.encode_prompt(expected_text, (t.image_token,), runs_apart=t.encode_runs_apart)
    expected = [x for i in ids for x in ([-1] * n if isinstance(i, str) else [i])]
    model = pipe.session.model
    holds_image = layout.is_image if model.image_placement == "splice" else layout.input_ids == model.image_placeholder_id()
    got = np.where(holds_image, -1, layout.input_ids)
    assert got.tolist() == expected
    assert (tok.eos_id in expected) == (type(pipe.session.model).arch_name == "internvl")
    # and the answer is greedy decoding of exactly that sequence
    pieces = render(t, [Turn("<image>What colour?", 1, "red"), Turn("And the shape?")], tok, n).pieces
    assert answer == tok.decode(greedy_by_hand(pipe, pieces, imgs[:1], 4))


@pytest.mark.parametrize("messages, match", [
    ([], "the conversation is empty"),
    ([{"role": "assistant", "content": "hi"}], "message 1 should come from the user"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 2 should come from the assistant"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "ends with an assistant message"),
])
def test_chat_errors(pipe, messages, match):
    with pytest.raises(PromptError, match=match):
        pipe.chat(messages)


# ------------------------------------------------------------------- errors
def test_placeholder_image_mismatch_is_a_prompt_error(pipe, imgs):
    with pytest.raises(PromptError, match=r"2 <image> placeholder\(s\) but 1 image"):
        pipe.generate(PROMPT, imgs[:1])
    with pytest.raises(PromptError, match=r"placeholder\(s\) but 0 image"):
        pipe.generate("What is <image>?", [])
    # errors come when the call is made, not when the stream is first read
    with pytest.raises(PromptError):
        pipe.stream(PROMPT, imgs[:1])


def test_images_without_placeholders_go_where_the_template_puts_them(pipe, imgs):
    """CogVLM (THUDM): right after BOS; llava-hf: after "USER: ", before the text; BLIP-2
    (transformers' Blip2Processor): before BOS; flamingo: after "User: "; InternVL: after
    "<|im_start|>user\n<img>"."""
    a = pipe.generate("What colour is it?", imgs[:1], max_new_tokens=4, stop_token_ids=())
    n = pipe.session.model.image_tokens()
    layout, _ = pipe.prepare([Turn(user="What colour is it?", images=1)], imgs[:1])
    start = template_family(pipe, {"cogvlm": "<s><image>", "llava": "<s>USER: <image>", "blip2": "<image><s>",
                                   "flamingo": "<s>User: <image>",
                                   "internvl": "<s><|im_start|>user\n<img><image>"})
    ids, _ = pipe.tokenizer.encode_prompt(start, ("<image>",))
    assert layout.image_spans == ((ids.index("<image>"), n),)
    # an image in a later turn goes where the template puts it too
    layout2, _ = pipe.prepare([Turn("hi", 0, "hello"), Turn("and this?", 1)], imgs[:1])
    assert len(layout2.image_spans) == 1
    pieces = render(pipe.template, [Turn(user="What colour is it?", images=1)], pipe.tokenizer, n).pieces
    assert a == pipe.tokenizer.decode(greedy_by_hand(pipe, pieces, imgs[:1], 4))


def test_prompt_longer_than_the_context(pipe, tokenizer, preprocess_config):
    with pytest.raises(PromptError, match=r"context holds 256; shorten the prompt"):
        pipe.generate("red " * 300)
    short = pipeline_from_model(pipe.session.model, tokenizer, preprocess_config, max_length=24)
    with pytest.raises(PromptError, match="context holds 24"):
        short.generate("what colour is the big red circle on the left?")
    k = 24 // pipe.session.model.image_tokens() + 1  # enough images to fill the context by themselves
    with pytest.raises(PromptError, match="fewer images"):
        short.generate("<image>" * k, [np.zeros((32, 32, 3), np.uint8)] * k)
