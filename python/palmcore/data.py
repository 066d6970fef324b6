"""Training data: text files -> documents -> token ids cached once in a memory-mapped file ->
packed windows of ``seq_len + 1`` tokens, with the end-of-document id between documents.

    cache = TokenCache.build(["corpus/", "notes/*.md"], tokenizer, "runs/x/data")
    train = PackedDataset(cache, seq_len=256, split="train", seed=0)
    tokens = train.batch(step=k, batch_size=8)      # int32 [8, 257]: a pure function of (seed, k)

The cache (``tokens.bin`` + ``index.json``) is reused while the files (paths, sizes, mtimes)
and the tokenizer model are unchanged, and rebuilt when either changes. Each file is one
document; the held-out split takes whole documents, chosen by the seed.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from pathlib import Path

import numpy as np

from palmcore.tokenizer import EOD_ID, Tokenizer

_FORMAT = "palmcore-token-cache/1"


def stdlib_files() -> list[str]:
    """The running interpreter's own standard-library sources, test folders left out: a
    corpus on every machine with Python, the embedded default's."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "__pycache__"}
    return [str(p) for p in sorted(root.rglob("*.py")) if not skip & set(p.relative_to(root).parts)]


def find_files(paths: list[str]) -> list[str]:
    """Files named directly, found under folders (recursively) or matched by globs; sorted,
    without duplicates. Raises ValueError when a path matches nothing."""
    found = set()
    for path in paths:
        if os.path.isdir(path):
            for root, _, names in os.walk(path):
                found.update(os.path.join(root, n) for n in names)
        elif os.path.isfile(path):
            found.add(path)
        else:
            matches = [m for m in glob.glob(path, recursive=True) if os.path.isfile(m)]
            if not matches:
                raise ValueError(f"corpus path {path!r} matches no file")
            found.update(matches)
    return sorted(os.path.abspath(f) for f in found)


def text_files(paths: list[str]) -> tuple[list[str], list[str]]:
    """(text files, binary files) among the files ``paths`` name. A file is binary when its
    first 8 KiB hold a NUL byte; binary files are left out of the corpus. Raises ValueError
    when nothing is left to train on."""
    files = find_files(paths)
    if not files:
        raise ValueError(f"the corpus {', '.join(paths)} holds no files")
    text, binary = [], []
    for path in files:
        with open(path, "rb") as f:
            (binary if b"\0" in f.read(8192) else text).append(path)
    if not text:
        raise ValueError(f"the corpus {', '.join(paths)} holds no text: its {len(binary)} files are binary")
    return text, binary


def _fingerprint(files: list[str], tokenizer: Tokenizer) -> str:
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    with open(tokenizer.model_path, "rb") as f:
        h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


class TokenCache:
    """Every document's token ids in one memory-mapped array, with each document's [start, end)."""

    def __init__(self, directory: str):
        with open(os.path.join(directory, "index.json")) as f:
            index = json.load(f)
        if index.get("format") != _FORMAT:
            raise ValueError(f"{directory}: not a palmcore token cache")
        self.directory = directory
        self.fingerprint = index["fingerprint"]
        self.files = index["files"]
        self.bounds = np.asarray(index["bounds"], dtype=np.int64).reshape(-1, 2)
        self.tokens = np.memmap(os.path.join(directory, "tokens.bin"), dtype=index["dtype"], mode="r",
                                shape=(index["num_tokens"],)) if index["num_tokens"] else np.zeros(0, np.int32)
        self.rebuilt = False

    @classmethod
    def build(cls, paths: list[str], tokenizer: Tokenizer, directory: str) -> "TokenCache":
        """The cache for ``paths`` under ``directory``: reused when still current, else rebuilt."""
        files, _ = text_files(paths)
        fingerprint = _fingerprint(files, tokenizer)
        if os.path.exists(os.path.join(directory, "index.json")):
            try:
                cache = cls(directory)
                if cache.fingerprint == fingerprint:
                    return cache
            except (ValueError, KeyError, json.JSONDecodeError, OSError):
                pass  # stale or damaged: rebuild
        os.makedirs(directory, exist_ok=True)
        dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
        bounds, total = [], 0
        tmp_tokens = os.path.join(directory, "tokens.bin.tmp")
        with open(tmp_tokens, "wb") as out:
            for path in files:
                with open(path, encoding="utf-8", errors="replace") as f:
                    ids = tokenizer.encode_to_array(f.read(), dtype)
                out.write(ids.tobytes())
                bounds.append([total, total + len(ids)])
                total += len(ids)
        index = {"format": _FORMAT, "fingerprint": fingerprint, "files": files, "bounds": bounds,
                 "dtype": np.dtype(dtype).name, "num_tokens": total}
        tmp_index = os.path.join(directory, "index.json.tmp")
        with open(tmp_index, "w") as f:
            json.dump(index, f)
        os.replace(tmp_tokens, os.path.join(directory, "tokens.bin"))
        os.replace(tmp_index, os.path.join(directory, "index.json"))
        cache = cls(directory)
        cache.rebuilt = True
        return cache


class PackedDataset:
    """One split's documents joined with the end-of-document id and cut into windows of
    ``seq_len + 1`` tokens (stride ``seq_len``, so every token is a target once).

    Documents go to the held-out split with probability ``val_fraction`` (at least one
    document each when there are two or more, and enough for one window when the corpus
    allows), drawn from ``seed``. When whole documents cannot give both splits a window (one
    document, or a few short ones), the split falls within the documents instead: the held-out
    split is the last ``max(val_fraction, one window)`` of the joined corpus, and
    ``split_note`` says so."""

    def __init__(self, cache: TokenCache, seq_len: int, split: str = "train", seed: int = 0,
                 val_fraction: float = 0.05):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        held_out = _held_out_documents(cache, seq_len, seed, val_fraction)
        sizes = cache.bounds[:, 1] - cache.bounds[:, 0] + 1  # + the end-of-document id
        self.split_note = ""
        if held_out is not None:
            docs = np.flatnonzero(held_out if split == "val" else ~held_out)
            segments = cache.bounds[docs]
        else:
            docs, segments = _split_within_documents(cache, seq_len, val_fraction, split)
            self.split_note = (f"the corpus has too few documents ({len(cache.bounds)}) for a held-out split "
                               f"by document: the held-out split is the last {_val_tokens(cache, seq_len, val_fraction)} "
                               "tokens of the corpus instead")
        self.cache, self.seq_len, self.seed, self.documents = cache, seq_len, seed, docs
        self.segments = np.asarray(segments, dtype=np.int64).reshape(-1, 2)  # [start, end) in cache.tokens
        lengths = self.segments[:, 1] - self.segments[:, 0] + 1          # + the end-of-document id
        self._starts = np.concatenate([[0], np.cumsum(lengths)])         # in the joined stream
        self.num_tokens = int(self._starts[-1])
        self.num_windows = max(0, (self.num_tokens - 1) // seq_len)
        if self.num_windows == 0:
            raise ValueError(f"the {split} split has {self.num_tokens} tokens: too few for one "
                             f"window of {seq_len + 1} (the corpus holds {int(sizes.sum())} tokens in "
                             f"{len(sizes)} documents)")
        self._epoch_order: dict[int, np.ndarray] = {}

    def window(self, w: int) -> np.ndarray:
        """Tokens [w·seq_len, w·seq_len + seq_len + 1) of the joined stream, int32."""
        begin, end = w * self.seq_len, w * self.seq_len + self.seq_len + 1
        out = np.empty(end - begin, dtype=np.int32)
        d = int(np.searchsorted(self._starts, begin, side="right")) - 1
        pos = begin
        while pos < end:
            seg_begin = int(self._starts[d])
            start, stop = self.segments[d]
            take = min(end, int(self._starts[d + 1])) - pos
            offset = pos - seg_begin
            body = min(take, int(stop - start) - offset)   # tokens of the segment itself
            if body > 0:
                out[pos - begin:pos - begin + body] = self.cache.tokens[start + offset:start + offset + body]
            if body < take:
                out[pos - begin + max(body, 0)] = EOD_ID     # the separator after the segment
            pos += take
            d += 1
        return out

    def batch(self, step: int, batch_size: int) -> np.ndarray:
        """Windows for optimizer step ``step`` (from 0): int32 [batch_size, seq_len + 1], a pure
        function of (seed, step, batch_size). Each epoch visits every window once, in an order
        drawn from (seed, epoch)."""
        rows = []
        for sample in range(step * batch_size, (step + 1) * batch_size):
            epoch, position = divmod(sample, self.num_windows)
            if epoch not in self._epoch_order:
                self._epoch_order = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)}
            rows.append(self.window(int(self._epoch_order[epoch][position])))
        return np.stack(rows)


def fitting_seq_len(cache: TokenCache, wanted: int, seed: int = 0) -> int:
    """The largest of ``wanted``, wanted // 2, wanted // 4, ... for which both splits of the
    cache hold a window; a corpus too small even for seq_len 1 is a ValueError saying so."""
    seq_len = wanted
    while True:
        try:
            PackedDataset(cache, seq_len, "train", seed=seed)
            PackedDataset(cache, seq_len, "val", seed=seed)
            return seq_len
        except ValueError:
            if seq_len == 1:
                raise
            seq_len //= 2


def _held_out_documents(cache: TokenCache, seq_len: int, seed: int, val_fraction: float):
    """A boolean mask of the held-out documents, or None when whole documents cannot give
    both splits a window."""
    n_docs = len(cache.bounds)
    held_out = np.random.default_rng([seed, 0x5E1]).random(n_docs) < val_fraction
    if n_docs >= 2 and not held_out.any():
        held_out[np.random.default_rng([seed, 0x5E2]).integers(n_docs)] = True
    if n_docs >= 2 and held_out.all():
        held_out[0] = False
    # The held-out split needs at least one window: hold out more documents, in an order
    # drawn from the seed, while the rest keeps one.
    sizes = cache.bounds[:, 1] - cache.bounds[:, 0] + 1
    for d in np.random.default_rng([seed, 0x5E3]).permutation(n_docs):
        if sizes[held_out].sum() > seq_len + 1:
            break
        if not held_out[d] and sizes[~held_out].sum() - sizes[d] > seq_len + 1:
            held_out[d] = True
    window = seq_len + 1  # tokens of one window, in the joined stream
    if sizes[held_out].sum() < window or sizes[~held_out].sum() < window:
        return None
    return held_out


def _val_tokens(cache: TokenCache, seq_len: int, val_fraction: float) -> int:
    total = int(cache.bounds[-1, 1]) if len(cache.bounds) else 0
    return max(seq_len + 1, int(np.ceil(val_fraction * total)))


def _split_within_documents(cache: TokenCache, seq_len: int, val_fraction: float, split: str):
    """(document of each segment, segments [start, end)) of one split when the held-out split
    is the corpus's last tokens: the document holding the cut is split in two."""
    cut = int(cache.bounds[-1, 1]) - _val_tokens(cache, seq_len, val_fraction) if len(cache.bounds) else 0
    docs, segments = [], []
    for d, (start, stop) in enumerate(cache.bounds):
        start, stop = (start, min(stop, cut)) if split == "train" else (max(start, cut), stop)
        if stop > start:
            docs.append(d)
            segments.append((start, stop))
    return np.asarray(docs, dtype=np.int64), segments
