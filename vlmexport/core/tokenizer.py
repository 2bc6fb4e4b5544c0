"""SentencePiece tokenizer (LLaMA conventions: <unk>=0, <s>=1, </s>=2, byte fallback).

``train_tokenizer`` builds the project's own tokenizer for models trained from scratch;
the file it writes is a regular ``tokenizer.model`` that llama.cpp's converter, the
Hugging Face LLaMA tokenizer and every vlmexport backend read.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from .errors import CheckpointError


class Tokenizer:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: tokenizer.model is missing; copy the model's SentencePiece file there")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as exc:
            raise CheckpointError(f"{self.path}: not a SentencePiece model ({exc}); re-save the tokenizer") from None

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Encode one text piece; SentencePiece adds its dummy-prefix "▁" to every call."""
        ids = list(self.sp.EncodeAsIds(text)) if text else []
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def id_to_piece(self, i: int) -> str:
        return self.sp.IdToPiece(int(i))

    def serialized(self) -> bytes:
        return self.path.read_bytes()


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
