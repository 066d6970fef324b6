"""Tokenizer: SentencePiece with PaLM's lossless settings (PALM_SPEC.md, "Tokenizer").

Whitespace is kept exactly (no dummy prefix, no collapsing), digits are split into single
tokens, characters outside the vocabulary fall back to their UTF-8 bytes, normalization is
the identity, and the special ids are pad 0, end-of-document 1 (``</s>``), unk 2, bos 3. So
``decode(encode(s)) == s`` for every string.

SentencePiece writes a space as U+2581 ("▁") internally and decodes every U+2581 back to a
space, so a text that holds U+2581 itself would not survive. The tokenizer escapes it (and its
escape character) before encoding and restores it after decoding.
"""

from __future__ import annotations

import io
import os
import re
from typing import Iterable

import sentencepiece as spm

PAD_ID, EOD_ID, UNK_ID, BOS_ID = 0, 1, 2, 3

_ESCAPE = "\ue000"  # a private-use character: _ESCAPE + "e" stands for _ESCAPE, + "s" for "▁"
_UNESCAPE = re.compile(_ESCAPE + "([es])")


def _escape(text: str) -> str:
    return text.replace(_ESCAPE, _ESCAPE + "e").replace("\u2581", _ESCAPE + "s")


def _unescape(text: str) -> str:
    return _UNESCAPE.sub(lambda m: _ESCAPE if m.group(1) == "e" else "\u2581", text)


class Tokenizer:
    """A trained SentencePiece model with PaLM's settings."""

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise ValueError(f"no tokenizer model at {model_path}")
        self.model_path = os.path.abspath(model_path)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(model_path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{model_path} is not a SentencePiece model ({e})") from None
        specials = (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id(), self._sp.bos_id())
        if specials != (PAD_ID, EOD_ID, UNK_ID, BOS_ID):
            raise ValueError(f"{model_path} has special ids (pad, eos, unk, bos) = {specials}; "
                             f"palmcore needs {(PAD_ID, EOD_ID, UNK_ID, BOS_ID)}")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, model_path: str,
              max_sentence_length: int = 16384) -> "Tokenizer":
        """Train on an iterable of texts (each split into lines) and save ``model_path``
        (``.model``, with ``.vocab`` beside it)."""
        if vocab_size < 260:
            raise ValueError(f"vocab_size must be at least 260 (4 specials + 256 bytes), got {vocab_size}")
        prefix = model_path[:-len(".model")] if model_path.endswith(".model") else model_path
        lines = (_escape(line) for text in texts for line in text.splitlines() if line)
        spm.SentencePieceTrainer.Train(
            sentence_iterator=lines, model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
            character_coverage=0.9995, byte_fallback=True, split_digits=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_by_whitespace=True,
            max_sentence_length=max_sentence_length, pad_id=PAD_ID, eos_id=EOD_ID, unk_id=UNK_ID,
            bos_id=BOS_ID, hard_vocab_limit=False, minloglevel=2, num_threads=1)
        return cls(prefix + ".model")

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return self._sp.EncodeAsIds(_escape(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode_batch takes a list of str")
        return self._sp.EncodeAsIds([_escape(t) for t in texts])

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        return _unescape(self._sp.DecodeIds(ids))

    def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]
