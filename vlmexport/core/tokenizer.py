"""The model's own tokenizer: ``tokenizer.json`` through the ``tokenizers`` library where it
exists, the SentencePiece ``tokenizer.model`` as the fallback.

``Tokenizer(path)`` takes either file; the ``tokenizer_config.json`` and
``special_tokens_map.json`` beside it give the special-token strings, the added tokens,
``add_bos_token`` and ``legacy``, as they do for transformers. ``encode_prompt`` encodes a
whole rendered chat prompt the way a transformers tokenizer does: special and added tokens
(and the image placeholder) are split out first, the text between them is encoded, BOS is
added where the tokenizer adds it unless the prompt already starts with it.

SentencePiece fallback, as transformers' LLaMA tokenizer (its Metaspace pre-tokenizer) does
it: ``legacy`` (the default of a bare ``tokenizer.model``, and how the project's own models
were trained) gives every text run between special tokens SentencePiece's dummy-prefix "▁";
``legacy: false`` gives it only to the start of the prompt; a run that starts with a space
gets none (the space is its "▁"). The SentencePiece model's own normaliser applies (LLaMA's
is the identity; a model trained with whitespace folding keeps folding it).

``train_tokenizer`` builds the project's own tokenizer for models trained from scratch;
the file it writes is a regular ``tokenizer.model`` that llama.cpp's converter, the
Hugging Face LLaMA tokenizer and every vlmexport backend read.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import sentencepiece as spm

from .errors import CheckpointError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_MODEL, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP)
SPIECE_UNDERLINE = "▁"


def tokenizer_file(model_dir: str | os.PathLike) -> Path | None:
    """The tokenizer a directory holds: ``tokenizer.json`` first, else ``tokenizer.model``."""
    d = Path(model_dir)
    for name in (TOKENIZER_JSON, TOKENIZER_MODEL):
        if (d / name).is_file():
            return d / name
    return None


def _token_str(v: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); fix or re-save the tokenizer") from None
    return d if isinstance(d, dict) else {}


class Tokenizer:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_dir():
            found = tokenizer_file(self.path)
            if found is None:
                raise CheckpointError(f"{self.path}: no tokenizer.json or tokenizer.model; copy the model's tokenizer "
                                      "files there")
            self.path = found
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: the tokenizer file is missing; copy the model's tokenizer.json or "
                                  "SentencePiece tokenizer.model there")
        self.config = _read_json(self.path.parent / TOKENIZER_CONFIG)
        self.special_map = _read_json(self.path.parent / SPECIAL_TOKENS_MAP)
        self.kind = "tokenizers" if self.path.suffix == ".json" else "sentencepiece"
        self.sp = self.hf = None
        if self.kind == "tokenizers":
            from tokenizers import Tokenizer as HFTokenizer

            try:
                self.hf = HFTokenizer.from_file(str(self.path))
            except Exception as exc:  # the Rust side raises its own exception type
                raise CheckpointError(f"{self.path}: not a tokenizers file ({str(exc).splitlines()[0]}); re-save the "
                                      "tokenizer with save_pretrained") from None
        else:
            self.sp = spm.SentencePieceProcessor()
            try:
                self.sp.Load(str(self.path))
            except (OSError, RuntimeError) as exc:
                raise CheckpointError(f"{self.path}: not a SentencePiece model ({exc}); re-save the tokenizer") from None
        self.legacy = bool(self.config.get("legacy", True))
        self._added = self._added_tokens()
        self._split_re: re.Pattern | None = None
        self._split_for: tuple[str, ...] = ()
        self._hf_plus: tuple | None = None

    # ------------------------------------------------------------- special tokens
    def _special(self, name: str) -> str | None:
        for src in (self.config, self.special_map):
            s = _token_str(src.get(name))
            if s:
                return s
        if self.sp is not None:  # a bare tokenizer.model: SentencePiece's own control pieces
            i = {"bos_token": self.sp.bos_id(), "eos_token": self.sp.eos_id(), "unk_token": self.sp.unk_id(),
                 "pad_token": self.sp.pad_id()}.get(name, -1)
            return self.sp.IdToPiece(i) if 0 <= i < self.sp.GetPieceSize() else None
        return None

    @property
    def bos_token(self) -> str | None:
        return self._special("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._special("eos_token")

    def special_tokens_map(self) -> dict[str, str]:
        """What transformers hands a chat template: bos_token, eos_token, unk_token, pad_token."""
        out = {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            s = self._special(name)
            if s is not None:
                out[name] = s
        return out

    def _added_tokens(self) -> dict[str, int]:
        """Added tokens (split out of the text before encoding) -> id."""
        out: dict[str, int] = {}
        if self.hf is not None:
            for i, t in self.hf.get_added_tokens_decoder().items():
                out[t.content] = int(i)
            return out
        for i, t in (self.config.get("added_tokens_decoder") or {}).items():
            s = _token_str(t)
            # a token beyond the SentencePiece vocabulary was added by transformers (e.g. <image>)
            if s is not None and (self.sp.PieceToId(s) == int(i) or int(i) >= self.sp.GetPieceSize()):
                out[s] = int(i)
        for i in range(self.sp.GetPieceSize()):  # <s>, </s>, <unk> and user-defined symbols
            if self.sp.IsControl(i) or self.sp.IsUnknown(i) or self.sp.IsUnused(i):
                out.setdefault(self.sp.IdToPiece(i), i)
        return out

    def token_to_id(self, token: str) -> int | None:
        if self.hf is not None:
            return self.hf.token_to_id(token)
        i = self.sp.PieceToId(token)
        return None if i == self.sp.unk_id() and token != self.sp.IdToPiece(i) else i

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True) if self.hf is not None else self.sp.GetPieceSize()

    def _id(self, name: str, sp_value: int) -> int:
        if self.hf is None:
            return sp_value
        s = self._special(name)
        i = self.hf.token_to_id(s) if s else None
        return -1 if i is None else int(i)

    @property
    def bos_id(self) -> int:
        return self._id("bos_token", self.sp.bos_id() if self.sp else -1)

    @property
    def eos_id(self) -> int:
        return self._id("eos_token", self.sp.eos_id() if self.sp else -1)

    @property
    def unk_id(self) -> int:
        return self._id("unk_token", self.sp.unk_id() if self.sp else -1)

    @property
    def add_bos(self) -> bool:
        """Whether encoding a prompt prepends BOS (tokenizer_config's ``add_bos_token``; LLaMA: yes)."""
        if "add_bos_token" in self.config:
            return bool(self.config["add_bos_token"])
        if self.hf is not None:
            probe = self.hf.encode("a", add_special_tokens=True).ids
            return bool(probe) and self.bos_id >= 0 and probe[0] == self.bos_id
        return self.bos_id >= 0

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Encode one plain text (no special-token parsing, no BOS unless asked)."""
        ids = self._encode_text(text, first=True)[0] if text else []
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_prompt(self, text: str, placeholders: Sequence[str] = (), runs_apart: bool = False
                      ) -> tuple[list[int | str], list[tuple[int, int]]]:
        """Encode a rendered prompt as transformers' tokenizer does (``add_special_tokens`` unless the
        prompt starts with BOS, leading placeholders aside). Returns the ids, with each occurrence of a ``placeholders`` string
        kept as that string, and each id's (start, end) character offsets in ``text``.

        ``runs_apart``: every text run between special tokens is encoded as a text of its own (as
        THUDM's CogVLM encodes the text apart from the image tokens it puts after BOS)."""
        if self.hf is not None and not runs_apart:
            return self._hf_encode_prompt(text, tuple(placeholders))
        ids: list[int | str] = []
        offsets: list[tuple[int, int]] = []
        if self.add_bos and not self._starts_with_bos(text, tuple(placeholders)) and self.bos_id >= 0:
            ids.append(self.bos_id)
            offsets.append((0, 0))
        for start, end, special in self._split(text, tuple(placeholders)):
            chunk = text[start:end]
            if special:
                ids.append(chunk if chunk in placeholders else self._added[chunk])
                offsets.append((start, end))
                continue
            # only a run at the very start of the prompt is its start (Metaspace's "first" scheme)
            chunk_ids, chunk_offsets = self._encode_text(chunk, first=start == 0 or runs_apart)
            ids += chunk_ids
            offsets += [(start + a, start + b) for a, b in chunk_offsets]
        return ids, offsets

    def _starts_with_bos(self, text: str, placeholders: tuple[str, ...]) -> bool:
        """Whether the prompt begins with BOS, image placeholders in front of it aside: a template
        that writes BOS after the images (BLIP-2's processor puts the image tokens before BOS)
        gets no second BOS at the start."""
        bos = self.bos_token
        if not bos:
            return False
        i, marks = 0, [p for p in placeholders if p]
        while True:
            p = next((p for p in marks if text.startswith(p, i)), None)
            if p is None:
                return text.startswith(bos, i)
            i += len(p)

    def _hf_encode_prompt(self, text: str, placeholders: tuple[str, ...]
                          ) -> tuple[list[int | str], list[tuple[int, int]]]:
        """The whole prompt in one call, as transformers' processor tokenizes it; a placeholder the
        vocabulary lacks is added (in memory) as a special token, so it splits the text the same way."""
        tok = self.hf
        missing = [p for p in placeholders if p and self.hf.token_to_id(p) is None]
        if missing:
            from tokenizers import AddedToken
            from tokenizers import Tokenizer as HFTokenizer

            if self._hf_plus is None or self._hf_plus[0] != tuple(missing):
                t = HFTokenizer.from_str(self.hf.to_str())
                t.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in missing])
                self._hf_plus = (tuple(missing), t)
            tok = self._hf_plus[1]
        enc = tok.encode(text, add_special_tokens=not self._starts_with_bos(text, placeholders))
        marks = {tok.token_to_id(p): p for p in placeholders if p}
        return [marks.get(i, i) for i in enc.ids], [tuple(o) for o in enc.offsets]

    def _split(self, text: str, placeholders: tuple[str, ...]) -> Iterable[tuple[int, int, bool]]:
        if self._split_re is None or self._split_for != placeholders:
            names = sorted(set(self._added) | set(placeholders), key=len, reverse=True)
            self._split_re = re.compile("|".join(re.escape(n) for n in names if n)) if names else None
            self._split_for = placeholders
        pos = 0
        for m in (self._split_re.finditer(text) if self._split_re else ()):
            if m.start() > pos:
                yield pos, m.start(), False
            yield m.start(), m.end(), True
            pos = m.end()
        if pos < len(text):
            yield pos, len(text), False

    def _encode_text(self, text: str, first: bool) -> tuple[list[int], list[tuple[int, int]]]:
        """Encode text without special tokens. ``first``: the run starts the prompt (or is encoded
        as a text of its own), so a SentencePiece tokenizer adds its prefix "▁"."""
        if self.hf is not None:
            enc = self.hf.encode(text, add_special_tokens=False)
            return list(enc.ids), [tuple(o) for o in enc.offsets]
        if (first or self.legacy) and not text.startswith(" "):
            return self._sp_encode(text)
        # no dummy prefix: after a special token with legacy=False, or a run that starts with a space
        # (transformers' Metaspace prepends "▁" only where there is none); "<unk>" + text, as
        # transformers' slow LLaMA tokenizer does it
        unk = self.sp.IdToPiece(self.sp.unk_id())
        n_unk = len(self.sp.EncodeAsIds(unk))
        ids, offs = self._sp_encode(unk + text)
        return ids[n_unk:], [(max(0, a - len(unk)), max(0, b - len(unk))) for a, b in offs[n_unk:]]

    def _sp_encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        if not text:
            return [], []
        proto = self.sp.encode(text, return_type="proto")
        # SentencePiece offsets are in UTF-8 bytes: map them to characters
        char_at = _byte_to_char(text)
        return [p.id for p in proto.pieces], [(char_at[p.begin], char_at[p.end]) for p in proto.pieces]

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: Sequence[int]) -> str:
        if self.hf is not None:
            return self.hf.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size], skip_special_tokens=True)
        return self.sp.DecodeIds([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def id_to_piece(self, i: int) -> str:
        if self.hf is not None:
            return self.hf.id_to_token(int(i)) or ""
        return self.sp.IdToPiece(int(i))

    def serialized(self) -> bytes:
        return self.path.read_bytes()

    def files(self) -> list[Path]:
        """The tokenizer's files (the model file first) that a bundle or model directory carries."""
        return [self.path] + [self.path.parent / n for n in TOKENIZER_FILES
                              if (self.path.parent / n).is_file() and self.path.parent / n != self.path]


def _byte_to_char(text: str) -> list[int]:
    """For each UTF-8 byte offset of ``text`` (and its end), the character offset."""
    out: list[int] = []
    for ci, ch in enumerate(text):
        out += [ci] * len(ch.encode("utf-8"))
    out.append(len(text))
    return out


def train_tokenizer(lines: Iterable[str], out_path: str | os.PathLike, vocab_size: int = 1024,
                    model_type: str = "bpe", extra_symbols: Sequence[str] = ()) -> Path:
    """Train a LLaMA-style SentencePiece model on ``lines`` and write ``out_path``."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(list(lines)),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=list(extra_symbols),
        num_threads=1,  # deterministic
        hard_vocab_limit=False,
        minloglevel=2,
    )
    tmp = out_path.with_suffix(".tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, out_path)
    return out_path
