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

import os
import re
from typing import Iterable

import numpy as np
import sentencepiece as spm

from palmcore.files import open_regular

PAD_ID, EOD_ID, UNK_ID, BOS_ID = 0, 1, 2, 3

_ESCAPE = "\ue000"  # a private-use character: _ESCAPE + "e" stands for _ESCAPE, + "s" for "▁"
_UNESCAPE = re.compile(_ESCAPE + "([es])")
_MAX_MODEL_BYTES = 256 * 2**20  # a 256,000-piece model is about 5 MB
_PIECE_CHARS = 2048  # the longest "sentence" tokenizer training sees (escaped, at most 8 bytes a character)


def _escape(text: str) -> str:
    return text.replace(_ESCAPE, _ESCAPE + "e").replace("\u2581", _ESCAPE + "s")


def _unescape(text: str) -> str:
    return _UNESCAPE.sub(lambda m: _ESCAPE if m.group(1) == "e" else "\u2581", text)


def check_text(text, name: str = "text") -> str:
    """``text`` if it is a str that UTF-8 can hold; a lone surrogate (what Python makes of bytes
    that are not UTF-8 in argv or a surrogateescape stream) raises ValueError naming where."""
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raw = text[e.start].encode("utf-8", "surrogateescape") if 0xDC80 <= ord(text[e.start]) <= 0xDCFF else None
        what = f"the byte 0x{raw[0]:02x}, which is not UTF-8," if raw else f"a lone surrogate U+{ord(text[e.start]):04X}"
        raise ValueError(f"{name} is not valid UTF-8 text: {what} at character {e.start}") from None
    return text


class Tokenizer:
    """A trained SentencePiece model with PaLM's settings."""

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise ValueError(f"no tokenizer model at {model_path}")
        self.model_path = os.path.abspath(model_path)
        self._sp = spm.SentencePieceProcessor()
        with open_regular(model_path, _MAX_MODEL_BYTES) as f:
            proto = f.read()
        try:
            self._sp.LoadFromSerializedProto(proto)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{model_path} is not a SentencePiece model ({e})") from None
        specials = (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id(), self._sp.bos_id())
        if specials != (PAD_ID, EOD_ID, UNK_ID, BOS_ID):
            raise ValueError(f"{model_path} has special ids (pad, eos, unk, bos) = {specials}; "
                             f"palmcore needs {(PAD_ID, EOD_ID, UNK_ID, BOS_ID)}")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, model_path: str,
              max_chars: int = 20_000_000) -> "Tokenizer":
        """Train on an iterable of texts (each split into lines) and save ``model_path``
        (``.model``, with ``.vocab`` beside it). Lines are cut into pieces of at most
        2,048 characters, and training reads at most ``max_chars`` characters: memory stays
        bounded whatever the corpus (one huge line, a huge file)."""
        return cls._train((line for text in texts for line in text.splitlines()), vocab_size,
                          model_path, max_chars)

    @classmethod
    def train_on_files(cls, files: list[str], vocab_size: int, model_path: str,
                       max_chars: int = 20_000_000) -> "Tokenizer":
        """:meth:`train` on text files, read a line at a time (bytes that are not UTF-8 are
        replaced by U+FFFD)."""
        def lines():
            for path in files:
                with open(path, encoding="utf-8", errors="replace") as f:
                    for raw in f:
                        yield from raw.splitlines()  # the line breaks str.splitlines knows
        return cls._train(lines(), vocab_size, model_path, max_chars)

    @classmethod
    def _train(cls, lines: Iterable[str], vocab_size: int, model_path: str, max_chars: int) -> "Tokenizer":
        if vocab_size < 260:
            raise ValueError(f"vocab_size must be at least 260 (4 specials + 256 bytes), got {vocab_size}")
        prefix = model_path[:-len(".model")] if model_path.endswith(".model") else model_path
        # trained under a temporary name, then renamed: a killed training leaves no half-written model
        tmp_prefix = f"{prefix}.tmp-{os.getpid()}"
        fed = {"chars": 0, "sentences": 0}

        def sentences():
            for line in lines:
                line = line.rstrip("\r\n")
                for i in range(0, len(line), _PIECE_CHARS):
                    if fed["chars"] >= max_chars:
                        return
                    piece = line[i:i + _PIECE_CHARS]
                    fed["chars"] += len(piece)
                    fed["sentences"] += 1
                    yield _escape(piece)

        try:
            spm.SentencePieceTrainer.Train(
                sentence_iterator=sentences(), model_prefix=tmp_prefix, vocab_size=vocab_size, model_type="bpe",
                character_coverage=0.9995, byte_fallback=True, split_digits=True,
                normalization_rule_name="identity", remove_extra_whitespaces=False,
                add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_by_whitespace=True,
                max_sentence_length=8 * _PIECE_CHARS, pad_id=PAD_ID, eos_id=EOD_ID, unk_id=UNK_ID,
                bos_id=BOS_ID, hard_vocab_limit=False, minloglevel=2, num_threads=1)
        except BaseException as e:
            for suffix in (".vocab", ".model"):
                if os.path.exists(tmp_prefix + suffix):
                    os.unlink(tmp_prefix + suffix)
            if isinstance(e, RuntimeError):
                raise ValueError(f"SentencePiece could not train a {vocab_size}-token tokenizer on this text "
                                 f"({fed['sentences']} lines, {fed['chars']} characters): {e}") from None
            raise
        os.replace(tmp_prefix + ".vocab", prefix + ".vocab")
        os.replace(tmp_prefix + ".model", prefix + ".model")  # last: the model appears whole or not at all
        return cls(prefix + ".model")

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    def max_token_chars(self) -> int | None:
        """The most characters of text one token can stand for, so that a text of C characters
        encodes to at least C / max_token_chars() tokens: the longest piece (measured escaped,
        which is never shorter than the text it stands for); a byte token stands for at most one
        character. None without byte fallback: a run of characters outside the vocabulary becomes
        one unknown token, however long."""
        sp = self._sp
        if sum(sp.IsByte(i) for i in range(self.vocab_size)) < 256:
            return None
        return max(1 if sp.IsByte(i) else len(sp.IdToPiece(i)) for i in range(self.vocab_size)
                   if not (sp.IsControl(i) or sp.IsUnknown(i) or sp.IsUnused(i)))

    def encode(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(_escape(check_text(text)))

    def encode_to_array(self, text: str, dtype=np.int32, chunk_chars: int = 1 << 20) -> np.ndarray:
        """``encode(text)`` as an array. A text longer than ``chunk_chars`` is encoded in
        pieces cut after a line break (or, in a longer line, anywhere), so that memory stays
        bounded however long the text: SentencePiece takes about 45 bytes per character to
        encode a text whole. Ids are then those of encoding each piece on its own, which can
        differ from encoding the whole text only at the cuts; a text up to ``chunk_chars``
        is encoded whole."""
        check_text(text)
        parts, start = [], 0
        while start < len(text):
            end = min(len(text), start + chunk_chars)
            if end < len(text):
                end = text.rfind("\n", start, end) + 1 or end
            parts.append(np.asarray(self._sp.EncodeAsIds(_escape(text[start:end])), dtype=dtype))
            start = end
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of str")
        return self._sp.EncodeAsIds([_escape(check_text(t)) for t in texts])

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        return _unescape(self._sp.DecodeIds(ids))

    def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]
