"""Token cache and packed windows: reuse and invalidation, exact packing with the
end-of-document id, a held-out split by document, batches as a pure function of (seed, step)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from palmcore import Tokenizer
from palmcore.data import PackedDataset, TokenCache, find_files, text_files
from palmcore.tokenizer import EOD_ID


@pytest.fixture()
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "42", "  ", "\n", "x=1;", "é", "中"]
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    for i in range(12):
        text = "".join(rng.choice(words, size=int(rng.integers(5, 60))))
        (folder / ("sub" if i % 3 else "") / f"doc{i:02d}.txt").write_text(text)
    tok = Tokenizer.train([p.read_text() for p in sorted(folder.rglob("*.txt"))], 300,
                          str(tmp_path / "tok.model"))
    return folder, tok, tmp_path / "cache"


def test_cache_is_reused_and_invalidated(corpus):
    folder, tok, cache_dir = corpus
    first = TokenCache.build([str(folder)], tok, str(cache_dir))
    assert first.rebuilt and len(first.bounds) == 12
    assert not TokenCache.build([str(folder)], tok, str(cache_dir)).rebuilt
    victim = sorted(folder.rglob("*.txt"))[3]
    victim.write_text(victim.read_text() + " more")
    os.utime(victim, ns=(1, 10**18))
    assert TokenCache.build([str(folder)], tok, str(cache_dir)).rebuilt
    # every document's ids are the tokenizer's encoding of its file
    cache = TokenCache.build([str(folder)], tok, str(cache_dir))
    for path, (start, stop) in zip(cache.files, cache.bounds):
        assert list(cache.tokens[start:stop]) == tok.encode(open(path).read())


def test_windows_pack_documents_with_separators(corpus):
    folder, tok, cache_dir = corpus
    cache = TokenCache.build([str(folder)], tok, str(cache_dir))
    data = PackedDataset(cache, seq_len=7, split="train", seed=3)
    stream = np.concatenate([np.append(cache.tokens[s:e], EOD_ID) for s, e in cache.bounds[data.documents]])
    assert data.num_tokens == len(stream)
    for w in range(data.num_windows):
        assert np.array_equal(data.window(w), stream[w * 7:w * 7 + 8])


def test_held_out_split_is_by_document(corpus):
    folder, tok, cache_dir = corpus
    cache = TokenCache.build([str(folder)], tok, str(cache_dir))
    train = PackedDataset(cache, 5, "train", seed=1, val_fraction=0.25)
    val = PackedDataset(cache, 5, "val", seed=1, val_fraction=0.25)
    assert set(train.documents).isdisjoint(val.documents)
    assert sorted(set(train.documents) | set(val.documents)) == list(range(12))
    assert len(val.documents) >= 1


def test_batches_are_a_function_of_seed_and_step(corpus):
    folder, tok, cache_dir = corpus
    cache = TokenCache.build([str(folder)], tok, str(cache_dir))
    a = PackedDataset(cache, 6, seed=5)
    b = PackedDataset(cache, 6, seed=5)
    later = [b.batch(k, 3) for k in (7, 2, 0)]  # any order, a fresh instance: same batches
    assert all(np.array_equal(a.batch(k, 3), x) for k, x in zip((7, 2, 0), later))
    assert not np.array_equal(PackedDataset(cache, 6, seed=6).batch(0, 3), a.batch(0, 3))
    epoch = np.concatenate([a.batch(k, 1) for k in range(a.num_windows)])
    assert sorted(map(tuple, epoch)) == sorted(tuple(a.window(w)) for w in range(a.num_windows))
    assert a.batch(0, 3).dtype == np.int32 and a.batch(0, 3).shape == (3, 7)


def test_errors(corpus, tmp_path):
    folder, tok, cache_dir = corpus
    with pytest.raises(ValueError, match=r"matches no file"):
        find_files([str(tmp_path / "nothing-*.txt")])
    cache = TokenCache.build([str(folder)], tok, str(cache_dir))
    with pytest.raises(ValueError, match=r"too few for one window"):
        PackedDataset(cache, 10**6)
    with pytest.raises(ValueError, match=r"split must be 'train' or 'val'"):
        PackedDataset(cache, 4, split="test")


def test_few_documents_split_within_them(corpus, tmp_path):
    """One document (or a few short ones) cannot be split by document: the held-out split is
    then the corpus's last tokens, and together the splits hold every token once."""
    folder, tok, _ = corpus
    one = tmp_path / "one"
    one.mkdir()
    (one / "only.txt").write_text("".join((folder / "doc00.txt").read_text() * 40))
    cache = TokenCache.build([str(one)], tok, str(tmp_path / "one-cache"))
    train = PackedDataset(cache, 8, "train", seed=0, val_fraction=0.1)
    val = PackedDataset(cache, 8, "val", seed=0, val_fraction=0.1)
    assert "too few documents (1)" in train.split_note and train.num_windows >= 1 and val.num_windows >= 1
    n = int(cache.bounds[0, 1])
    (a, b), (c, d) = train.segments[0], val.segments[0]
    assert a == 0 and b == c and d == n and d - c == max(9, int(np.ceil(0.1 * n)))
    assert np.array_equal(train.window(0)[:9], cache.tokens[:9])
    assert np.array_equal(val.window(0)[:9], cache.tokens[c:c + 9])
    # many documents: split by document as before, no note
    many = TokenCache.build([str(folder)], tok, str(tmp_path / "many-cache"))
    assert PackedDataset(many, 5, "train", seed=1).split_note == ""


def test_binary_files_are_left_out(corpus, tmp_path):
    folder, tok, _ = corpus
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.txt").write_text("alpha beta")
    (mixed / "blob.bin").write_bytes(b"\x7fELF\x00\x01" * 100)
    text, binary = text_files([str(mixed)])
    assert [os.path.basename(p) for p in text] == ["a.txt"] and [os.path.basename(p) for p in binary] == ["blob.bin"]
    cache = TokenCache.build([str(mixed)], tok, str(tmp_path / "cache"))
    assert [os.path.basename(p) for p in cache.files] == ["a.txt"]


def test_long_texts_are_encoded_in_pieces(corpus):
    """encode_to_array equals encode for a text up to its chunk size, and cuts a longer one
    after a line break (each piece encoded alone) without losing a character."""
    _, tok, _ = corpus
    text = "".join(f"x=1; alpha {i} beta\n  gamma é中\n" for i in range(50))
    assert list(tok.encode_to_array(text, np.uint16, chunk_chars=len(text))) == tok.encode(text)
    for chunk in (7, 40, 101):
        ids = tok.encode_to_array(text, np.uint16, chunk_chars=chunk)
        assert ids.dtype == np.uint16 and tok.decode(ids) == text
    assert tok.decode(tok.encode_to_array("no line break " * 20, np.int32, chunk_chars=9)) == "no line break " * 20
    assert tok.encode_to_array("", np.int32).shape == (0,)
