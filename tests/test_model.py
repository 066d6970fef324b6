"""Tests of palmcore.PaLM, the C++ model, against palmcore.reference (the float64 oracle).

Accuracy criterion: for every compared quantity (logits, loss, ce and every gradient of
``model.grads()``) the error (helpers.scaled_err)

    max|a - b| / max(max|b|, floor)

of the C++ float32 result ``a`` against the float64 reference ``b`` must be <= 1e-4
(REL_TOL; observed worst about 1.3e-6). The floors: 1 for logits (the tied unit-std embedding
makes logits O(1)), 1 nat for loss and ce, and for each gradient tensor the largest reference
gradient entry over all parameters of the same forward_backward (GRAD floor). The last matters:
with T = 1 attention sees one key, so the gradients of wq and wk are exactly 0 in the reference
and float32 rounding noise (about 1e-8 of the gradient scale) divided by their own norm is
meaningless. Each non-degenerate gradient tensor is at least ~6 % of that scale in these cases,
so an error of 1 % in any of them is still caught. The reference runs on exactly the float32 values that were loaded into the model
(cast back to float64), so the error measures the C++ arithmetic only, not the rounding of
the parameters. ``tokens`` (the counted-target count) must match exactly.

Covered: n_kv_heads 1 (multi-query), 1 < n_kv_heads < H (grouped) and H (multi-head);
head_dim != D / H; odd T; B > 1; ignored targets (< 0); several seeds; 1 and 2 threads;
B*T > 64 (many rows); a vocabulary large enough that the loss works on the logits in
several row chunks. Also: gradient accumulation and zero_grad, bit-identical results with
1 and 2 threads, initialization (determinism and the spec's statistics), state_dict
names/shapes/roundtrip, the presets and the parameter/FLOP accounting.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

import palmcore
from palmcore import PaLM, PaLMConfig
from palmcore import reference as ref

from helpers import max_abs, random_params, random_tokens, scaled_err, tiny_configs

REL_TOL = 1e-4
LOGITS_FLOOR = 1.0   # logits are O(1): unit-std tied embedding over normalized activations
LOSS_FLOOR = 1.0     # 1 nat: ce >= 0 is about log V for these random models

# --------------------------------------------------------------------------- fixtures, helpers


@pytest.fixture
def restore_threads():
    old = palmcore.get_num_threads()
    try:
        yield
    finally:
        palmcore.set_num_threads(old)


def cfg_id(c) -> str:
    return (f"V{c.vocab_size}-D{c.d_model}-L{c.n_layers}-H{c.n_heads}-kv{c.n_kv_heads}"
            f"-dh{c.head_dim}-F{c.ffn_dim}")


def float32_params(cfg, seed):
    """(float32 params to load into the model, the same values as float64 for the reference)."""
    p32 = {name: w.astype(np.float32) for name, w in random_params(cfg, seed).items()}
    p64 = {name: w.astype(np.float64) for name, w in p32.items()}
    return p32, p64


def make_batch(cfg, B, T, seed):
    """Random tokens and targets with some ignored targets (-1, -100, int32 min)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, size=(B, T), dtype=np.int64)
    targets = rng.integers(0, cfg.vocab_size, size=(B, T), dtype=np.int64)
    ignored = rng.random((B, T)) < 0.2
    targets[ignored] = rng.choice([-1, -100, -(2**31)], size=int(ignored.sum()))
    targets[0, 0] = -1          # at least one ignored in every batch
    targets[B - 1, T - 1] = 0   # and id 0 counted
    if T > 1:
        targets[B - 1, 0] = cfg.vocab_size - 1   # and the last id
    return tokens, targets


def model_with(cfg, p32, seed=0):
    model = PaLM(cfg, seed=seed)
    model.load_state_dict(p32)
    return model


def check_scalar(name, got, want):
    err = scaled_err(got, want, floor=LOSS_FLOOR)
    assert err <= REL_TOL, f"{name}: got {got!r}, reference {want!r}, err {err:.2e}"


def check_grads(got, want, tol=REL_TOL):
    """Every gradient tensor against the reference, with the GRAD floor: the largest reference
    gradient entry over all parameters (a tensor can be 0, e.g. wq and wk with T = 1)."""
    floor = max_abs(want)
    assert floor > 0, "the reference gradients are all zero: nothing to compare against"
    for name, g in got.items():
        err = scaled_err(g, want[name], floor=floor)
        assert err <= tol, f"grad {name}: err {err:.2e} (floor {floor:.3g})"


def check_against_reference(model, cfg, p64, tokens, targets, expected=None):
    """Compare forward logits and forward_backward (loss, ce, tokens, every gradient)."""
    if expected is None:
        expected = reference_results(cfg, p64, tokens, targets)
    want_logits, want = expected
    logits = model.forward(tokens)
    assert logits.dtype == np.float32 and logits.shape == want_logits.shape
    err = scaled_err(logits, want_logits, floor=LOGITS_FLOOR)
    assert err <= REL_TOL, f"logits: err {err:.2e}"

    model.zero_grad()
    out = model.forward_backward(tokens, targets)
    assert set(out) == {"loss", "ce", "tokens"}
    assert out["tokens"] == want["tokens"] == int((targets >= 0).sum())
    check_scalar("loss", out["loss"], want["loss"])
    check_scalar("ce", out["ce"], want["ce"])
    grads = model.grads()
    assert list(grads) == list(cfg.param_shapes())
    for name, g in grads.items():
        assert g.dtype == np.float32 and g.shape == cfg.param_shapes()[name], name
    check_grads(grads, want["grads"])


def reference_results(cfg, p64, tokens, targets):
    return ref.forward(p64, cfg, tokens), ref.loss_and_grads(p64, cfg, tokens, targets)


# --------------------------------------------------------------------------- against the reference

_tiny = tiny_configs()
# (config, B, T): every kind of attention grouping, head_dim != D/H, odd T, B > 1.
CASES = [
    (_tiny[0], 2, 5),      # multi-query, dh 4 != D/H 3
    (_tiny[1], 3, 7),      # grouped 6 -> 2, dh 6 != D/H
    (_tiny[2], 2, 9),      # multi-head (kv = H), larger eps
    (_tiny[3], 2, 11),     # grouped 4 -> 2, dh 2
    # multi-head with head_dim != D/H, three layers, default z_loss
    (PaLMConfig(vocab_size=41, d_model=10, n_layers=3, n_heads=2, n_kv_heads=2, head_dim=8,
                ffn_dim=16, max_seq_len=13), 3, 13),     # T == max_seq_len
    # multi-query without z-loss, one position
    (PaLMConfig(vocab_size=17, d_model=6, n_layers=1, n_heads=3, n_kv_heads=1, head_dim=4,
                ffn_dim=10, max_seq_len=4, z_loss=0.0), 4, 1),
    # many rows (B*T = 210 > 64) and a longer causal window
    (PaLMConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                ffn_dim=64, max_seq_len=80, z_loss=1e-2), 3, 70),
]
CASE_IDS = [f"{cfg_id(c)}-B{B}-T{T}" for c, B, T in CASES]
SEEDS = [0, 1, 2]


@functools.lru_cache(maxsize=None)
def _case(k, seed):
    """Inputs and reference results of case k at seed (computed once, shared by thread counts)."""
    cfg, B, T = CASES[k]
    p32, p64 = float32_params(cfg, seed=1000 * k + seed)
    tokens, targets = make_batch(cfg, B, T, seed=7 + 1000 * k + seed)
    return cfg, p32, p64, tokens, targets, reference_results(cfg, p64, tokens, targets)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", range(len(CASES)), ids=CASE_IDS)
def test_matches_reference(k, seed, threads):
    cfg, p32, p64, tokens, targets, expected = _case(k, seed)
    model = model_with(cfg, p32)
    check_against_reference(model, cfg, p64, tokens, targets, expected)


def test_batch_shape_changes_between_calls(threads):
    """One model, calls of different [B, T] in turn: each still matches the reference, and a
    repeated shape gives bit-identical results (no stale buffers)."""
    cfg = _tiny[0]
    p32, p64 = float32_params(cfg, seed=42)
    model = model_with(cfg, p32)
    shapes = [(2, 5), (3, 7), (1, 16), (2, 5)]
    logits = []
    for i, (B, T) in enumerate(shapes):
        tokens, targets = make_batch(cfg, B, T, seed=50 + (i % 3))
        check_against_reference(model, cfg, p64, tokens, targets)
        logits.append(model.forward(tokens))
    assert np.array_equal(logits[0], logits[-1])


# Vocabulary large enough that the loss works on the logits in row chunks: the chunk is
# max(64, 2**24 // V) rows, i.e. 64 rows for V > 2**18, so B*T = 69 rows make two chunks
# (64 + 5). Reference run once (about 3 s), compared for both thread counts.
CHUNK_CFG = PaLMConfig(vocab_size=2**18 + 3, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1,
                       head_dim=4, ffn_dim=8, max_seq_len=32, z_loss=1e-2)
CHUNK_B, CHUNK_T = 3, 23


@functools.lru_cache(maxsize=None)
def _chunk_case():
    cfg = CHUNK_CFG
    assert CHUNK_B * CHUNK_T > max(64, 2**24 // cfg.vocab_size)
    p32, p64 = float32_params(cfg, seed=5)
    tokens, targets = make_batch(cfg, CHUNK_B, CHUNK_T, seed=6)
    targets[2, 20] = -1                    # an ignored target in the second chunk
    z, out = reference_results(cfg, p64, tokens, targets)
    return p32, p64, tokens, targets, (z, out)


def test_large_vocab_loss_in_chunks_matches_reference(threads):
    p32, p64, tokens, targets, expected = _chunk_case()
    model = model_with(CHUNK_CFG, p32)
    check_against_reference(model, CHUNK_CFG, p64, tokens, targets, expected)


def test_large_vocab_same_bits_with_1_and_2_threads(restore_threads):
    p32, _, tokens, targets, _ = _chunk_case()
    model = model_with(CHUNK_CFG, p32)
    results = []
    for n in (1, 2):
        palmcore.set_num_threads(n)
        model.zero_grad()
        out = model.forward_backward(tokens, targets)
        results.append((out, model.grads()))
    (out1, g1), (out2, g2) = results
    assert out1 == out2
    for name in g1:
        assert np.array_equal(g1[name], g2[name]), name


def test_token_dtypes_and_layouts_agree():
    """Any integer dtype, a nested list and a non-contiguous view give the same logits."""
    cfg = _tiny[1]
    p32, _ = float32_params(cfg, seed=3)
    model = model_with(cfg, p32)
    wide = random_tokens(cfg, 3, 14, seed=4)
    tokens = wide[:, ::2]                                  # non-contiguous [3, 7]
    assert not tokens.flags["C_CONTIGUOUS"]
    want = model.forward(np.ascontiguousarray(tokens))
    for variant in (tokens, tokens.astype(np.int32), tokens.astype(np.int16),
                    tokens.astype(np.uint8), tokens.astype(np.uint64), tokens.tolist(),
                    np.asfortranarray(tokens)):
        assert np.array_equal(model.forward(variant), want)
    targets = np.asfortranarray(random_tokens(cfg, 3, 7, seed=5))
    a = model.forward_backward(tokens, targets)
    b = model.forward_backward(np.ascontiguousarray(tokens).astype(np.int32),
                               np.ascontiguousarray(targets).astype(np.int32))
    assert a == b


# --------------------------------------------------------------------------- accumulation

def test_gradients_accumulate_and_zero_grad_resets():
    cfg = _tiny[0]
    p32, _ = float32_params(cfg, seed=8)
    model = model_with(cfg, p32)
    tokens, targets = make_batch(cfg, 2, 7, seed=9)
    assert all(not g.any() for g in model.grads().values())      # a new model: zero grads
    first = model.forward_backward(tokens, targets)
    once = model.grads()
    second = model.forward_backward(tokens, targets)
    twice = model.grads()
    assert first == second
    for name in once:
        assert once[name].any(), name
    # float32 g + g == 2 g exactly, so the tolerance is tight
    check_grads(twice, {n: 2 * g.astype(np.float64) for n, g in once.items()}, tol=1e-6)
    model.zero_grad()
    for name, g in model.grads().items():
        assert np.array_equal(g, np.zeros_like(g)), name
    # after zero_grad one call gives the first call's gradients again, bit for bit
    assert model.forward_backward(tokens, targets) == first
    for name, g in model.grads().items():
        assert np.array_equal(g, once[name]), name


def test_accumulation_over_different_batches_is_the_sum():
    cfg = _tiny[2]
    p32, p64 = float32_params(cfg, seed=10)
    model = model_with(cfg, p32)
    batches = [make_batch(cfg, 2, 5, seed=11), make_batch(cfg, 3, 9, seed=12)]
    for tokens, targets in batches:
        model.forward_backward(tokens, targets)
    total = model.grads()
    want = [ref.loss_and_grads(p64, cfg, t, y)["grads"] for t, y in batches]
    check_grads(total, {name: want[0][name] + want[1][name] for name in total})


def test_all_targets_ignored(threads):
    cfg = _tiny[1]
    p32, _ = float32_params(cfg, seed=13)
    model = model_with(cfg, p32)
    tokens = random_tokens(cfg, 2, 5, seed=14)
    ignored = np.array([[-1, -100, -1, -5, -(2**31)], [-1, -1, -2, -1, -1]])
    out = model.forward_backward(tokens, ignored)
    assert out == {"loss": 0.0, "ce": 0.0, "tokens": 0}
    for name, g in model.grads().items():
        assert not g.any(), name
    # and on top of existing gradients: nothing is added, nothing is reset
    model.forward_backward(*make_batch(cfg, 2, 5, seed=15))
    before = model.grads()
    assert model.forward_backward(tokens, ignored)["tokens"] == 0
    for name, g in model.grads().items():
        assert np.array_equal(g, before[name]), name


# --------------------------------------------------------------------------- threads

THREAD_CFGS = [
    PaLMConfig(vocab_size=500, d_model=64, n_layers=2, n_heads=4, n_kv_heads=1,
               ffn_dim=256, max_seq_len=64),
    PaLMConfig(vocab_size=301, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2,
               head_dim=12, ffn_dim=96, max_seq_len=64, z_loss=1e-2),
]


@pytest.mark.parametrize("cfg", THREAD_CFGS, ids=[cfg_id(c) for c in THREAD_CFGS])
def test_same_bits_with_1_and_2_threads(cfg, restore_threads):
    B, T = 4, 33
    p32, _ = float32_params(cfg, seed=16)
    tokens, targets = make_batch(cfg, B, T, seed=17)
    results = []
    for n in (1, 2):
        palmcore.set_num_threads(n)
        assert palmcore.get_num_threads() == n
        model = model_with(cfg, p32)
        logits = model.forward(tokens)
        out = model.forward_backward(tokens, targets)
        results.append((logits, out, model.grads()))
    (z1, o1, g1), (z2, o2, g2) = results
    assert np.array_equal(z1, z2), "logits differ between 1 and 2 threads"
    assert o1 == o2, f"loss differs: {o1} (1 thread) vs {o2} (2 threads)"
    for name in g1:
        assert np.array_equal(g1[name], g2[name]), f"grad {name} differs between 1 and 2 threads"


def test_init_does_not_depend_on_threads(restore_threads):
    cfg = THREAD_CFGS[0]
    states = []
    for n in (1, 2):
        palmcore.set_num_threads(n)
        states.append(PaLM(cfg, seed=3).state_dict())
    for name in states[0]:
        assert np.array_equal(states[0][name], states[1][name]), name


# --------------------------------------------------------------------------- initialization

def test_init_is_deterministic_in_the_seed():
    cfg = _tiny[0]
    a, b = PaLM(cfg, seed=7).state_dict(), PaLM(cfg, seed=7).state_dict()
    c = PaLM(cfg, seed=8).state_dict()
    for name in a:
        assert np.array_equal(a[name], b[name]), name
        if name.endswith("norm.scale"):
            assert np.array_equal(a[name], c[name]), name          # ones whatever the seed
        else:
            assert not np.array_equal(a[name], c[name]), name
            assert not np.isin(a[name], c[name]).mean() > 0.01, name   # not a shuffle either
    big = PaLM(cfg, seed=2**64 - 1).state_dict()
    assert not np.array_equal(big["embed"], a["embed"])
    assert PaLM(cfg).state_dict()["embed"].tobytes() == PaLM(cfg, seed=0).state_dict()["embed"].tobytes()


def test_init_statistics_follow_the_spec():
    # H*dh = 192 != D = 128 and F = 320 != 4D, so each fan-in is distinguishable.
    cfg = PaLMConfig(vocab_size=2000, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2,
                     head_dim=48, ffn_dim=320, max_seq_len=16)
    D, F, qw = cfg.d_model, cfg.ffn_dim, cfg.n_heads * cfg.head_dim
    want_std = {"embed": 1.0, "attn.wq": D ** -0.5, "attn.wk": D ** -0.5, "attn.wv": D ** -0.5,
                "attn.wo": qw ** -0.5, "mlp.w_gate": D ** -0.5, "mlp.w_up": D ** -0.5,
                "mlp.w_down": F ** -0.5}
    state = PaLM(cfg, seed=123).state_dict()
    for name, w in state.items():
        assert w.dtype == np.float32 and np.isfinite(w).all(), name
        if name.endswith("norm.scale"):
            assert np.array_equal(w, np.ones(D, np.float32)), f"{name} is not exactly 1"
            continue
        std = want_std[name.split(".", 2)[-1] if name != "embed" else "embed"]
        x = w.astype(np.float64).ravel() / std
        n = x.size                                   # >= 12288 values per tensor
        assert abs(x.mean()) < 6 / math.sqrt(n), f"{name}: mean {x.mean() * std:.3g}"
        assert abs(x.std() - 1) < 0.05, f"{name}: std {x.std() * std:.4g}, spec {std:.4g}"
        # normal, not uniform: ~68.3 % within one std, ~95.4 % within two, kurtosis 3
        assert abs((np.abs(x) < 1).mean() - 0.6827) < 0.02, name
        assert abs((np.abs(x) < 2).mean() - 0.9545) < 0.01, name
        assert abs((x ** 4).mean() - 3) < 0.3, name
    # distinct tensors are independent draws (same shapes, same std)
    pairs = [("layers.0.attn.wk", "layers.0.attn.wv"), ("layers.0.attn.wq", "layers.1.attn.wq"),
             ("layers.0.mlp.w_gate", "layers.0.mlp.w_up")]
    for a, b in pairs:
        corr = np.corrcoef(state[a].ravel(), state[b].ravel())[0, 1]
        assert abs(corr) < 0.05, f"{a} and {b} are correlated: {corr:.3f}"


# --------------------------------------------------------------------------- state_dict, config

def test_state_dict_names_shapes_and_roundtrip():
    for cfg in _tiny + [CASES[4][0]]:
        model = PaLM(cfg, seed=1)
        state = model.state_dict()
        shapes = cfg.param_shapes()
        assert list(state) == list(shapes)                    # names, in the spec's order
        assert {n: w.shape for n, w in state.items()} == shapes
        assert all(w.dtype == np.float32 for w in state.values())
        assert model.num_params() == cfg.num_params() == sum(w.size for w in state.values())
        # roundtrip into another model: exactly the same values, and the same outputs
        other = PaLM(cfg, seed=2)
        other.load_state_dict(state)
        again = other.state_dict()
        for name in state:
            assert np.array_equal(again[name], state[name]), name
        tokens = random_tokens(cfg, 2, 5, seed=3)
        assert np.array_equal(other.forward(tokens), model.forward(tokens))


def test_state_dict_and_grads_are_copies():
    cfg = _tiny[0]
    model = PaLM(cfg, seed=1)
    state = model.state_dict()
    original = state["embed"].copy()
    state["embed"][0, 0] += 1.0
    state["final_norm.scale"][:] = 5.0
    fresh = model.state_dict()
    assert np.array_equal(fresh["embed"], original)
    assert np.array_equal(fresh["final_norm.scale"], np.ones(cfg.d_model, np.float32))
    model.forward_backward(*make_batch(cfg, 2, 3, seed=2))
    grads = model.grads()
    grads["embed"][:] = 0.0
    assert model.grads()["embed"].any()
    # load_state_dict copies too: changing the source array afterwards changes nothing
    src = {n: w.copy() for n, w in fresh.items()}
    model.load_state_dict(src)
    src["embed"][:] = 0.0
    assert np.array_equal(model.state_dict()["embed"], fresh["embed"])


def test_load_state_dict_accepts_any_memory_layout():
    cfg = _tiny[1]
    p32, _ = float32_params(cfg, seed=4)
    layouts = {n: (np.asfortranarray(w) if w.ndim == 2 else w[::-1].copy()[::-1])
               for n, w in p32.items()}
    assert not layouts["embed"].flags["C_CONTIGUOUS"]
    model = PaLM(cfg, seed=0)
    model.load_state_dict(layouts)
    for name, w in model.state_dict().items():
        assert np.array_equal(w, p32[name]), name


SPEC_PRESETS = {   # PALM_SPEC.md: V, D, L, H, dh, F, Hkv
    "seed": (10000, 256, 6, 8, 32, 1024, 1),
    "palm-8b": (256000, 4096, 32, 16, 256, 16384, 1),
    "palm-62b": (256000, 8192, 64, 32, 256, 32768, 1),
    "palm-540b": (256000, 18432, 118, 48, 256, 73728, 1),
}
# The paper's Table 1 parameter counts (8.63B, 62.50B, 540.35B).
PAPER_PARAMS = {"palm-8b": 8.63e9, "palm-62b": 62.50e9, "palm-540b": 540.35e9}


@pytest.mark.parametrize("name", list(SPEC_PRESETS))
def test_presets(name):
    cfg = PaLMConfig.preset(name)
    V, D, L, H, dh, F, Hkv = SPEC_PRESETS[name]
    fields = (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.head_dim,
              cfg.ffn_dim, cfg.n_kv_heads)
    assert fields == SPEC_PRESETS[name]
    assert (cfg.max_seq_len, cfg.rope_base, cfg.norm_eps, cfg.z_loss) == (2048, 10000.0, 1e-5, 1e-4)
    shapes = cfg.param_shapes()
    assert len(shapes) == 2 + 8 * L
    assert shapes["embed"] == (V, D) and shapes["final_norm.scale"] == (D,)
    for i in (0, L - 1):
        p = f"layers.{i}."
        assert shapes[p + "norm.scale"] == (D,)
        assert shapes[p + "attn.wq"] == (D, H * dh)
        assert shapes[p + "attn.wk"] == shapes[p + "attn.wv"] == (D, Hkv * dh)
        assert shapes[p + "attn.wo"] == (H * dh, D)
        assert shapes[p + "mlp.w_gate"] == shapes[p + "mlp.w_up"] == (D, F)
        assert shapes[p + "mlp.w_down"] == (F, D)
    assert f"layers.{L}.norm.scale" not in shapes
    n = cfg.num_params()
    assert n == V * D + D + L * (D + D * H * dh + 2 * D * Hkv * dh + H * dh * D + 3 * D * F)
    if name in PAPER_PARAMS:
        want = PAPER_PARAMS[name]
        assert abs(n - want) <= 1e-3 * want, f"{name}: num_params() = {n}, paper {want:.5g}"
    for T in (1, 2048):
        assert cfg.flops_per_token(T) == 6 * n + 12 * L * H * dh * T
    assert name in PaLMConfig.presets()


def test_palm_540b_parameter_count():
    n = PaLMConfig.preset("palm-540b").num_params()
    assert abs(n - 540.35e9) <= 1e-3 * 540.35e9, f"palm-540b num_params() = {n}, paper 540.35e9"


def test_preset_overrides_and_config_roundtrip():
    cfg = PaLMConfig.preset("seed", vocab_size=123, n_kv_heads=8, max_seq_len=64)
    assert (cfg.vocab_size, cfg.n_kv_heads, cfg.max_seq_len, cfg.d_model) == (123, 8, 64, 256)
    assert PaLMConfig.from_dict(cfg.to_dict()) == cfg
    d = PaLMConfig(vocab_size=11, d_model=12, n_layers=1, n_heads=3)
    assert (d.head_dim, d.ffn_dim, d.n_kv_heads) == (4, 48, 1)


def test_flops_per_token_tiny():
    for cfg in _tiny:
        n = cfg.num_params()
        assert n == PaLM(cfg).num_params()
        for T in (1, 7, 16):
            assert cfg.flops_per_token(T) == 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * T


def test_concurrent_calls_from_python_threads_are_serialized():
    """Compute runs with the GIL released; calls on one model from several Python threads must
    not interleave (each result equals the serial one)."""
    import threading

    cfg = PaLMConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    model = PaLM(cfg, seed=3)
    batches = [make_batch(cfg, 2, 31, seed) for seed in range(4)]
    expected = [model.forward(tokens) for tokens, _ in batches]
    results = [None] * len(batches)

    def work(i):
        for _ in range(3):
            results[i] = model.forward(batches[i][0])
            model.forward_backward(*batches[i])

    workers = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for got, want in zip(results, expected):
        assert np.array_equal(got, want)
