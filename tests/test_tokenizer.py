"""The tokenizer's PaLM settings: lossless on every string (property test), digits split,
whitespace kept, the spec's special ids, clear errors."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from palmcore import Tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(errors="replace") for p in sorted(root.glob("*.py"))[:30]]
    texts.append("数字 1234567890 和 emoji 😀 ▁ tabs\tand  spaces")
    return Tokenizer.train(texts, 600, str(tmp_path_factory.mktemp("tok") / "t.model"))


WHITESPACE_HEAVY = st.text(alphabet=st.sampled_from(list(" \t\n\r\u3000\u00a0ab1▁\ue000")), max_size=60)
DIGITS = st.from_regex(r"[0-9]{1,80}", fullmatch=True)
CJK_EMOJI = st.text(alphabet=st.characters(min_codepoint=0x4E00, max_codepoint=0x4FFF) |
                    st.characters(min_codepoint=0x1F300, max_codepoint=0x1F64F), max_size=30)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200) | WHITESPACE_HEAVY | DIGITS | CJK_EMOJI)
def test_decode_encode_is_lossless(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_digits_are_single_tokens_and_whitespace_is_kept(tok):
    ids = tok.encode("9876543210")
    assert len(ids) == 10 and all(len(tok.decode([i])) == 1 for i in ids)
    assert tok.decode(tok.encode("a   b\t\tc\n\n")) == "a   b\t\tc\n\n"
    assert tok.encode(" x")[0] != tok.encode("x")[0]  # no dummy prefix: the space is kept


def test_special_ids_and_batches(tok):
    assert tok._sp.pad_id() == 0 and tok._sp.eos_id() == 1 and tok._sp.unk_id() == 2 and tok._sp.bos_id() == 3
    texts = ["def f():", "", "  return 42  "]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.decode_batch(tok.encode_batch(texts)) == texts
    reloaded = Tokenizer(tok.model_path)
    assert reloaded.encode("import os") == tok.encode("import os")


def test_errors(tok, tmp_path):
    with pytest.raises(ValueError, match=r"outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(TypeError, match=r"text must be a str, got bytes"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match=r"no tokenizer model at"):
        Tokenizer(str(tmp_path / "missing.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"is not a SentencePiece model"):
        Tokenizer(str(bad))
    with pytest.raises(ValueError, match=r"vocab_size must be at least 260"):
        Tokenizer.train(["abc"], 100, str(tmp_path / "small.model"))
