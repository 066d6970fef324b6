"""Generation: the KV-cached decoder against full forwards, the sampler against the float64
reference and its own distribution, batching, determinism and bad arguments.

Logits are compared by helpers.scaled_err (max|a - b| / max(max|b|, 1) over a row of logits,
1 being the O(1) scale of logits) with limit 1e-4, the same as the model tests; the sampler's
probabilities with floor 1 (their total), limit 1e-14; tokens are compared exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import palmcore
from palmcore import _core
from palmcore import reference as ref
from palmcore.config import PaLMConfig

from helpers import random_params, scaled_err

LOGITS_TOL = 1e-4
LOGITS_FLOOR = 1.0   # logits are O(1): unit-std tied embedding over normalized activations

CONFIGS = {
    # multi-query, odd vocab, max_seq_len past one 64-query block
    "mqa": PaLMConfig(vocab_size=61, d_model=16, n_layers=2, n_heads=4, n_kv_heads=1, ffn_dim=40,
                      max_seq_len=90),
    # grouped 6 -> 2, head_dim != D / H
    "gqa": PaLMConfig(vocab_size=37, d_model=12, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=4,
                      ffn_dim=20, max_seq_len=40, rope_base=100.0),
    # classic multi-head
    "mha": PaLMConfig(vocab_size=29, d_model=12, n_layers=1, n_heads=3, n_kv_heads=3, ffn_dim=18,
                      max_seq_len=40),
}


def make_model(cfg: PaLMConfig, seed: int = 0):
    """A model with random weights whose blocks outweigh the tied embedding (dense kernels at
    3x the init std), so that greedy decoding does not just repeat its input token.
    Returns (model, float64 params)."""
    params = {k: v if k == "embed" or "norm" in k else 3.0 * v for k, v in random_params(cfg, seed).items()}
    model = palmcore.PaLM(cfg)
    model.load_state_dict({k: v.astype(np.float32) for k, v in params.items()})
    return model, {k: v.astype(np.float32).astype(np.float64) for k, v in params.items()}


def prompts_for(cfg, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, cfg.vocab_size, size=n)] for n in lengths]


# ---- the cache: every step's logits equal a full forward over the sequence so far ----

@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_logits_equal_full_forward(name, threads):
    """Three slots prefilled together (lengths 1, 5 and 9, or 70 to cross a 64-query block),
    then decoded one token per step; at every step each slot's logits match the C++ full
    forward and the float64 reference over its whole sequence."""
    cfg = CONFIGS[name]
    model, params = make_model(cfg)
    long = 70 if cfg.max_seq_len >= 80 else 9
    seqs = prompts_for(cfg, [1, 5, long])
    cache = model.kv_cache(slots=3, capacity=cfg.max_seq_len)
    logits = cache.feed([t for s in seqs for t in s], [b for b, s in enumerate(seqs) for _ in s])
    rng = np.random.default_rng(1)
    for step in range(6):
        for b, seq in enumerate(seqs):
            full = model.forward(np.array([seq]))[0, -1]
            want = ref.forward(params, cfg, np.array([seq]))[0, -1]
            assert scaled_err(logits[b], full, floor=LOGITS_FLOOR) <= LOGITS_TOL, (step, b)
            assert scaled_err(logits[b], want, floor=LOGITS_FLOOR) <= LOGITS_TOL, (step, b)
        nxt = [int(t) for t in rng.integers(0, cfg.vocab_size, size=3)]
        for seq, t in zip(seqs, nxt):
            seq.append(t)
        logits = cache.feed(nxt, [0, 1, 2])
    assert cache.lengths == [len(s) for s in seqs]


def test_prefill_in_pieces_equals_one_prefill():
    """Feeding a prompt in pieces (and slots interleaved) continues positions across calls."""
    cfg = CONFIGS["mqa"]
    model, _ = make_model(cfg)
    seq = prompts_for(cfg, [23])[0]
    whole = model.kv_cache(1).feed(seq)
    pieces = model.kv_cache(2)
    pieces.feed(seq[:10], 1)
    pieces.feed(seq[:4], 0)
    pieces.feed(seq[10:17] + seq[4:9], [1] * 7 + [0] * 5)
    last = pieces.feed(seq[17:] + seq[9:], [1] * 6 + [0] * 14)
    assert scaled_err(last[0], whole[0], floor=LOGITS_FLOOR) <= LOGITS_TOL
    assert scaled_err(last[1], model.forward(np.array([seq]))[0, -1], floor=LOGITS_FLOOR) <= LOGITS_TOL
    assert pieces.lengths == [23, 23]


def test_cache_holds_only_kv_heads():
    """The point of multi-query attention: the cache holds n_kv_heads heads per layer, float32
    keys and values: 2 · L · slots · capacity · Hkv · dh · 4 bytes, H times less than MHA."""
    cfg = CONFIGS["mqa"]
    model, _ = make_model(cfg)
    cache = model.kv_cache(slots=2, capacity=33)
    assert cache.nbytes == 2 * cfg.n_layers * 2 * 33 * cfg.n_kv_heads * cfg.head_dim * 4
    assert cache.nbytes == cfg.kv_cache_bytes(slots=2, positions=33)
    mha = palmcore.PaLM(PaLMConfig(**{**cfg.to_dict(), "n_kv_heads": cfg.n_heads}))
    assert mha.kv_cache(slots=2, capacity=33).nbytes == cfg.n_heads * cache.nbytes
    assert cache.lengths == [0, 0]


# ---- greedy decoding ----

@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_equals_argmax_of_full_forwards(name, threads):
    cfg = CONFIGS[name]
    model, _ = make_model(cfg)
    prompt = prompts_for(cfg, [4])[0]
    got = model.generate([prompt], max_new_tokens=20, temperature=0, stop_tokens=())[0]
    seq = list(prompt)
    for _ in range(20):
        seq.append(int(np.argmax(model.forward(np.array([seq]))[0, -1])))
    assert got == seq[len(prompt):]
    assert len(set(got)) > 3  # the test model does not just repeat itself


def test_greedy_with_repetition_penalty_follows_the_spec():
    """Each token is the argmax of the full forward's logits after the spec's penalty."""
    cfg = CONFIGS["gqa"]
    model, _ = make_model(cfg, seed=3)
    prompt = prompts_for(cfg, [6], seed=3)[0]
    got = model.generate([prompt], max_new_tokens=15, temperature=0, repetition_penalty=1.8,
                         stop_tokens=())[0]
    seq = list(prompt)
    for _ in range(15):
        z = model.forward(np.array([seq]))[0, -1]
        ids, _ = ref.sampling_distribution(z, seen=seq, temperature=0, repetition_penalty=1.8)
        seq.append(int(ids[0]))
    assert got == seq[len(prompt):]
    plain = model.generate([prompt], max_new_tokens=15, temperature=0, stop_tokens=())[0]
    assert plain != got


def test_batch_of_different_lengths_equals_each_alone(threads):
    cfg = CONFIGS["mqa"]
    model, _ = make_model(cfg)
    prompts = prompts_for(cfg, [3, 11, 1, 70, 6], seed=5)
    batch = model.generate(prompts, max_new_tokens=12, temperature=0, stop_tokens=())
    alone = [model.generate([p], max_new_tokens=12, temperature=0, stop_tokens=())[0] for p in prompts]
    assert batch == alone


def test_prefill_longer_than_one_chunk():
    """Prompts of 2,100 tokens in all are prefilled in two calls (2,048 rows, then the rest),
    the cut falling inside the second prompt: the tokens are those of each prompt alone."""
    cfg = PaLMConfig(vocab_size=41, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=16,
                     max_seq_len=1200)
    model, _ = make_model(cfg)
    prompts = prompts_for(cfg, [1100, 1000], seed=7)
    kw = dict(max_new_tokens=6, temperature=0, stop_tokens=())
    assert model.generate(prompts, **kw) == [model.generate([p], **kw)[0] for p in prompts]
    seq = prompts[1] + model.generate([prompts[1]], **kw)[0][:1]
    assert model.generate([prompts[1]], **kw)[0][1] == int(np.argmax(model.forward(np.array([seq]))[0, -1]))


def test_sampled_rows_do_not_depend_on_their_batch(threads):
    """Draws are keyed by (seed, row, step): row i's tokens stay the same when the other rows
    change length or content, or finish early."""
    cfg = CONFIGS["mqa"]
    model, _ = make_model(cfg)
    a = prompts_for(cfg, [5, 9, 2], seed=1)
    b = [prompts_for(cfg, [30], seed=2)[0], a[1], prompts_for(cfg, [1], seed=3)[0]]
    kw = dict(max_new_tokens=25, temperature=1.0, top_k=0, top_p=1.0, stop_tokens=(), seed=11)
    assert model.generate(a, **kw)[1] == model.generate(b, **kw)[1]
    short = model.generate(a, **{**kw, "max_new_tokens": 25})
    early = model.generate([a[0], a[1]], **{**kw, "stop_tokens": (short[0][2],)})
    assert early[1] == short[1] and early[0] == short[0][: short[0].index(short[0][2]) + 1]


def test_same_seed_same_tokens_other_seed_other_tokens():
    cfg = CONFIGS["mqa"]
    model, _ = make_model(cfg)
    prompts = prompts_for(cfg, [4, 7], seed=2)
    kw = dict(max_new_tokens=30, temperature=1.0, top_k=0, top_p=1.0, stop_tokens=())
    first = model.generate(prompts, seed=123, **kw)
    assert model.generate(prompts, seed=123, **kw) == first
    assert model.generate(prompts, seed=124, **kw) != first
    old = palmcore.get_num_threads()
    try:
        palmcore.set_num_threads(1)
        assert model.generate(prompts, seed=123, **kw) == first
    finally:
        palmcore.set_num_threads(old)


def test_sampled_tokens_equal_the_reference_sampler():
    """Every sampled token is what palmcore.reference.sample draws from the full forward's
    logits with the same (seed, row, step): the whole rule, Philox included, matches."""
    cfg = CONFIGS["gqa"]
    model, _ = make_model(cfg, seed=4)
    prompts = prompts_for(cfg, [3, 8], seed=4)
    kw = dict(temperature=0.9, top_k=12, top_p=0.8, repetition_penalty=1.3, seed=77)
    out = model.generate(prompts, max_new_tokens=20, stop_tokens=(), **kw)
    for row, (prompt, new) in enumerate(zip(prompts, out)):
        seq = list(prompt)
        for step, token in enumerate(new):
            z = model.forward(np.array([seq]))[0, -1]
            assert token == ref.sample(z, seen=seq, row=row, step=step, **kw), (row, step)
            seq.append(token)


def test_stream_yields_the_tokens_of_generate():
    cfg = CONFIGS["mqa"]
    model, _ = make_model(cfg)
    prompt = prompts_for(cfg, [5])[0]
    kw = dict(max_new_tokens=17, temperature=0.7, seed=5, stop_tokens=())
    stream = model.stream(prompt, **kw)
    assert next(stream) == model.generate([prompt], **kw)[0][0]
    assert [model.generate([prompt], **kw)[0][0]] + list(stream) == model.generate([prompt], **kw)[0]


def test_stop_tokens_and_max_new_tokens():
    cfg = CONFIGS["mqa"]
    model, _ = make_model(cfg)
    prompts = prompts_for(cfg, [3, 6, 2], seed=9)
    free = model.generate(prompts, max_new_tokens=10, temperature=0, stop_tokens=())
    assert [len(o) for o in free] == [10, 10, 10]
    stop = free[1][4]
    stopped = model.generate(prompts, max_new_tokens=10, temperature=0, stop_tokens=(stop,))
    for full, got in zip(free, stopped):
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert got == full[:cut]            # the stop token is emitted, then the row ends
    assert model.generate(prompts, max_new_tokens=0) == [[], [], []]
    assert model.generate([[5]], max_new_tokens=cfg.max_seq_len - 1, temperature=0, stop_tokens=())[0]


# ---- the sampler's filters and distribution ----

def _logits(V, seed):
    return (np.random.default_rng(seed).standard_normal(V) * 2.0).astype(np.float32)


SETTINGS = [
    dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0),
    dict(temperature=0.7, top_k=8, top_p=1.0, repetition_penalty=1.0),
    dict(temperature=1.3, top_k=0, top_p=0.6, repetition_penalty=1.0),
    dict(temperature=0.8, top_k=10, top_p=0.9, repetition_penalty=1.5),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=["plain", "top_k", "top_p", "all"])
def test_filtered_distribution_matches_reference(settings):
    for seed, V in enumerate([1, 2, 17, 300, 1001]):
        z = _logits(V, seed)
        seen = list(np.random.default_rng(seed).integers(0, V, size=6))
        ids, probs = _core.kernels.filtered_distribution(z, [int(t) for t in seen], {**settings, "seed": 0})
        want_ids, want_probs = ref.sampling_distribution(z, seen, **settings)
        assert list(ids) == list(want_ids)
        # floor 1, the probabilities' total: a tail probability (e^-20 here) is not divided by
        # itself. Both sides are float64 (observed worst 3e-16).
        assert scaled_err(probs, want_probs, floor=1.0) <= 1e-14
        assert math.isclose(sum(probs), 1.0, rel_tol=1e-12)


def test_top_k_and_top_p_keep_exactly_their_sets():
    z = np.array([0.5, 3.0, 3.0, -1.0, 2.0, 2.5, 0.0], dtype=np.float32)
    dist = lambda **kw: _core.kernels.filtered_distribution(  # noqa: E731
        z, [], {**dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=0), **kw})[0]
    assert dist(top_k=1) == [1]                 # tie 3.0 / 3.0: the lower id
    assert dist(top_k=3) == [1, 2, 5]
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    assert dist(top_p=p[1] - 1e-6) == [1]       # the first token already reaches p
    assert dist(top_p=p[1] + 1e-6) == [1, 2]    # the crossing token is kept
    assert dist(top_p=p[1] + p[2] + p[5] + 1e-6) == [1, 2, 4, 5]
    assert dist(temperature=0) == [1]
    assert dist(top_k=7, top_p=1.0) == list(range(7))


def test_generated_tokens_stay_inside_top_k_and_nucleus():
    cfg = CONFIGS["mqa"]
    model, _ = make_model(cfg)
    prompts = prompts_for(cfg, [2, 5, 8], seed=6)
    for kw in (dict(top_k=3, top_p=1.0), dict(top_k=0, top_p=0.3)):
        out = model.generate(prompts, max_new_tokens=20, temperature=1.0, stop_tokens=(), seed=1, **kw)
        for prompt, new in zip(prompts, out):
            seq = list(prompt)
            for token in new:
                z = model.forward(np.array([seq]))[0, -1].astype(np.float64)
                if kw["top_k"]:
                    assert token in np.argsort(-z, kind="stable")[:3]
                else:
                    order = np.argsort(-z, kind="stable")
                    p = np.exp(z[order] - z.max())
                    nucleus = order[: int(np.argmax(np.cumsum(p) >= 0.3 * p.sum())) + 1]
                    assert token in nucleus
                seq.append(token)


def _chi_square_critical(df: int, z: float = 3.719) -> float:
    """Upper critical value of chi-square with df degrees of freedom at the normal quantile z
    (3.719: p = 1e-4), by the Wilson-Hilferty approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("settings", SETTINGS, ids=["plain", "top_k", "top_p", "all"])
def test_sampled_frequencies_match_the_filtered_distribution(settings):
    """20,000 draws (keyed by row 0..19999, step 3) against the filtered distribution: the
    chi-square statistic stays under its p = 1e-4 critical value, no draw leaves the kept set,
    and the same draws fail the test against the unfiltered softmax (the test can fail)."""
    V, n = 40, 20000
    z = _logits(V, 8)
    seen = [3, 5, 5, 30]
    full = {**settings, "seed": 2024}
    ids, probs = _core.kernels.filtered_distribution(z, seen, full)
    draws = np.array([_core.kernels.sample_token(z, seen, full, row, 3) for row in range(n)])
    assert set(np.unique(draws)) <= set(ids)
    counts = np.array([(draws == t).sum() for t in ids])
    expected = n * np.asarray(probs)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < _chi_square_critical(max(1, len(ids) - 1)), chi2
    if len(ids) < V:
        p_all = np.exp(z.astype(np.float64) - z.max())
        p_all /= p_all.sum()
        all_counts = np.bincount(draws, minlength=V)
        chi2_all = float(((all_counts - n * p_all) ** 2 / (n * p_all)).sum())
        assert chi2_all > _chi_square_critical(V - 1)


# ---- bad arguments ----

BAD = [
    (dict(temperature=-0.1), ValueError, "temperature must be"),
    (dict(temperature=float("nan")), ValueError, "temperature must be"),
    (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), ValueError, r"top_k must be in \[0, 2147483647\], got -1"),
    (dict(top_k=2.5), TypeError, "top_k must be an integer"),
    (dict(repetition_penalty=0.0), ValueError, "repetition_penalty must be"),
    (dict(max_new_tokens=-1), ValueError, r"max_new_tokens must be in \[0, 2147483647\], got -1"),
    (dict(seed=-1), ValueError, "seed must be in"),
    (dict(stop_tokens=(61,)), ValueError, "stop token 61 is outside the vocabulary"),
    (dict(stop_tokens=("x",)), TypeError, "a stop token must be an integer"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_sampling_arguments(kwargs, error, match):
    model, _ = make_model(CONFIGS["mqa"])
    with pytest.raises(error, match=match):
        model.generate([[1, 2]], **kwargs)
    with pytest.raises(error, match=match):
        model.stream([1, 2], **kwargs)


@pytest.mark.parametrize("prompts,error,match", [
    ([[1, 61]], ValueError, r"prompt 0: token id 61 at position 1 is outside the vocabulary \[0, 61\)"),
    ([[3], [-1]], ValueError, "prompt 1: token id -1 is outside the vocabulary"),
    ([[1], []], ValueError, "prompt 1 is empty"),
    ([], ValueError, "no prompts given"),
    ([1, 2, 3], TypeError, "wrap a single prompt in a list"),
    ("hello", TypeError, "must be a list of token-id lists"),
    ([[1.5, 2]], TypeError, "sequence of integer token ids"),
    ([[1] * 80], ValueError, r"prompt 0 has 80 tokens; with max_new_tokens 20 that is 100 > max_seq_len 90"),
])
def test_bad_prompts(prompts, error, match):
    model, _ = make_model(CONFIGS["mqa"])
    with pytest.raises(error, match=match):
        model.generate(prompts, max_new_tokens=20)


def test_bad_cache_use_changes_nothing():
    cfg = CONFIGS["mqa"]
    model, _ = make_model(cfg)
    with pytest.raises(ValueError, match="capacity must be in"):
        model.kv_cache(1, cfg.max_seq_len + 1)
    with pytest.raises(ValueError, match="at least one slot"):
        model.kv_cache(0)
    cache = model.kv_cache(2, capacity=5)
    first = cache.feed([1, 2, 3])
    with pytest.raises(ValueError, match="slot 2 at row 1 is outside the cache's 2 slots"):
        cache.feed([4, 5], [0, 2])
    with pytest.raises(ValueError, match="slot 0 would grow past the cache capacity of 5"):
        cache.feed([4, 5, 6])
    with pytest.raises(ValueError, match="tokens id 99 at flat index 0 is outside the vocabulary"):
        cache.feed([99])
    assert cache.lengths == [3, 0]
    again = model.kv_cache(2, capacity=5)
    again.feed([1, 2, 3])
    assert np.array_equal(cache.feed([4]), again.feed([4]))
    assert first.shape == (1, cfg.vocab_size)


def test_nan_logits_raise():
    settings = dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=0)
    with pytest.raises(RuntimeError, match=r"the logits hold NaN \(at token 1\)"):
        _core.kernels.sample_token(np.array([0.0, np.nan, 1.0], dtype=np.float32), [], settings, 0, 0)
