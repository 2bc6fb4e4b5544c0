"""The tokenizer front: which file is used, clear errors, placeholders, offsets."""

from __future__ import annotations

import json
import shutil

import pytest

from vlmexport.core.errors import CheckpointError
from vlmexport.core.tokenizer import Tokenizer


def test_a_bare_sentencepiece_model_keeps_its_legacy_encoding(tokenizer):
    """The project's own models: every run between special tokens gets its own "▁" prefix."""
    ids, _ = tokenizer.encode_prompt("<s>red<image>blue</s>", ("<image>",))
    assert ids == [tokenizer.bos_id] + tokenizer.encode("red") + ["<image>"] + tokenizer.encode("blue") + [
        tokenizer.eos_id]
    assert tokenizer.kind == "sentencepiece" and tokenizer.legacy and tokenizer.bos_token == "<s>"


def test_bos_after_leading_placeholders_is_not_doubled(tokenizer):
    """BLIP-2's processor puts the image tokens before BOS: a prompt rendered that way gets no
    BOS in front of the images; a prompt without BOS still gets one at the start."""
    ids, _ = tokenizer.encode_prompt("<image><image><s>red", ("<image>",))
    assert ids == ["<image>", "<image>", tokenizer.bos_id] + tokenizer.encode("red")
    ids, _ = tokenizer.encode_prompt("<image>red", ("<image>",))
    assert ids == [tokenizer.bos_id, "<image>"] + tokenizer.encode("red")
    ids, _ = tokenizer.encode_prompt("<image><s>red", ("<image>",), runs_apart=True)
    assert ids == ["<image>", tokenizer.bos_id] + tokenizer.encode("red")


def test_offsets_point_into_the_text_for_non_ascii(tokenizer):
    text = "<s>Café naïve 12 → ok"
    ids, offsets = tokenizer.encode_prompt(text)
    assert len(ids) == len(offsets)
    assert all(0 <= a <= b <= len(text) for a, b in offsets)
    assert max(b for _, b in offsets) == len(text)
    assert "".join(text[a:b] for a, b in offsets[1:]).replace(" ", "") == text[3:].replace(" ", "")


def test_tokenizer_json_wins_and_placeholders_split_like_added_tokens(tmp_path, tokenizer_path):
    pytest.importorskip("transformers")
    from transformers import LlamaTokenizer

    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(tokenizer_path, d / "tokenizer.model")
    LlamaTokenizer.from_pretrained(str(d), legacy=False).save_pretrained(d)
    tok = Tokenizer(d)
    assert tok.kind == "tokenizers" and tok.path.name == "tokenizer.json"
    assert [f.name for f in tok.files()][0] == "tokenizer.json" and "tokenizer.model" in [f.name for f in tok.files()]
    ids, _ = tok.encode_prompt("a<image>b", ("<image>",))  # <image> is not in this vocabulary
    assert "<image>" in ids and all(isinstance(i, int) for i in ids if i != "<image>")


def test_bad_tokenizer_files_are_one_line_errors(tmp_path, tokenizer_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json: not a tokenizers file"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    shutil.copy(tokenizer_path, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="tokenizer_config.json: not valid JSON"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"legacy": False, "add_bos_token": False}))
    tok = Tokenizer(tmp_path)
    assert not tok.legacy and not tok.add_bos
    assert tok.encode_prompt("hi")[0] == tok.encode("hi")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer(tmp_path / "empty")


def test_legacy_false_drops_the_prefix_after_a_special_token(tmp_path, tokenizer_path):
    shutil.copy(tokenizer_path, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"legacy": False}))
    new, old = Tokenizer(tmp_path), Tokenizer(tokenizer_path)
    a, _ = new.encode_prompt("<s>x<image>red", ("<image>",))
    b, _ = old.encode_prompt("<s>x<image>red", ("<image>",))
    assert b[b.index("<image>") + 1:] == old.encode("red")  # legacy: "▁red"
    assert a[a.index("<image>") + 1:] != old.encode("red")  # legacy=False: "red" without the prefix
    assert a[1:a.index("<image>")] != b[1:b.index("<image>")]  # "x" right after <s> is no prompt start either
