"""The sample_tokens op (PALM_SPEC "Sampling" for many rows where the logits are) on every
backend (`device`: cpu, and cuda where a GPU is): each row's token is what the one-row sampler
(sampler.cpp, itself held to palmcore.reference.sample in test_generate.py) chooses from the
same logits, row and step; a row with NaN gets -1 - (its first NaN's id). Logits include ties
(values repeated on purpose) so the tie rules of top-k, top-p and greedy are exercised, and
vocabularies of 5, 1000 and 4099 (not a multiple of the GPU's 256 threads).

The GPU sums in another order than the CPU (fixed, but not the same): a token may then differ
only when a draw or a threshold falls within a few ulps of a boundary, which these random
inputs do not hit; the comparison is exact."""

from __future__ import annotations

import numpy as np
import pytest

from palmcore import _core

K = _core.kernels

SETTINGS = {
    "greedy": dict(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=0),
    "plain": dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=1),
    "top_k": dict(temperature=0.7, top_k=7, top_p=1.0, repetition_penalty=1.0, seed=2),
    "top_p": dict(temperature=1.3, top_k=0, top_p=0.6, repetition_penalty=1.0, seed=3),
    "all": dict(temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.4, seed=4),
    "top_k_1": dict(temperature=1.0, top_k=1, top_p=1.0, repetition_penalty=1.0, seed=5),
}


def rows_of(V, n, seed):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((n, V)) * 2).astype(np.float32)
    logits[:, ::3] = np.round(logits[:, ::3])  # ties among every third id
    seen = [sorted(set(rng.integers(0, V, rng.integers(0, 6)).tolist())) for _ in range(n)]
    rows = rng.permutation(n).astype(np.int32) + 3
    steps = rng.integers(0, 50, n).astype(np.int32)
    return logits, rows, steps, seen


@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("V", [5, 1000, 4099])
def test_each_row_is_the_one_row_sampler(device, name, V):
    settings = SETTINGS[name]
    for seed in range(3):
        logits, rows, steps, seen = rows_of(V, 9, seed * 31 + V)
        got = K.sample_tokens_on(logits, rows, steps, seen, settings, device)
        want = [K.sample_token(logits[i], seen[i], settings, int(rows[i]), int(steps[i])) for i in range(9)]
        assert got.tolist() == want, (name, V, seed)
        again = K.sample_tokens_on(logits, rows, steps, seen, settings, device)
        assert np.array_equal(got, again)


def test_the_draws_are_spread(device):
    """Sampled tokens of a flat distribution cover it (a sampler stuck on one token fails)."""
    logits = np.zeros((64, 50), np.float32)
    got = K.sample_tokens_on(logits, np.arange(64, dtype=np.int32), np.zeros(64, np.int32), [[]] * 64,
                             SETTINGS["plain"], device)
    assert len(set(got.tolist())) > 25


def test_nan_rows_name_their_first_nan(device):
    logits, rows, steps, seen = rows_of(300, 4, 0)
    logits[1, 17] = np.nan
    logits[1, 200] = np.nan
    logits[3, 299] = np.nan
    got = K.sample_tokens_on(logits, rows, steps, seen, SETTINGS["all"], device)
    assert got[1] == -1 - 17 and got[3] == -1 - 299 and got[0] >= 0 and got[2] >= 0


def test_bad_arguments_are_refused():
    logits, rows, steps, seen = rows_of(10, 3, 0)
    with pytest.raises(ValueError, match="rows has shape"):
        K.sample_tokens_on(logits, rows[:2], steps, seen, SETTINGS["plain"], "cpu")
    with pytest.raises(ValueError, match="top_p must be in"):
        K.sample_tokens_on(logits, rows, steps, seen, {**SETTINGS["plain"], "top_p": 0.0}, "cpu")
