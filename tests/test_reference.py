"""Tests of palmcore.reference, the float64 NumPy oracle of PALM_SPEC.md.

The analytic gradients are checked against central finite differences of the reference's own
loss, for every parameter of several tiny configurations; the forward pass against an
independent loop-by-loop transcription of the spec; and a few pieces by hand.

Errors are helpers.scaled_err (max|a - b| / max(max|b|, floor)) with a stated floor: for
gradients the largest analytic gradient entry over all parameters, for logits 1 (they are
O(1)), so that a quantity that is ~0 (a sampled subset of a gradient, one logit) is not divided
by itself."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from palmcore import reference as ref
from palmcore.config import PaLMConfig

from helpers import max_abs, random_params, random_tokens, scaled_err, tiny_configs

# Central differences (f(w + eps) - f(w - eps)) / (2 eps) in float64: truncation error ~eps^2
# and round-off ~1e-16 / eps, both far below the tolerance (observed worst ~3e-10).
FD_EPS = 1e-5
FD_REL_TOL = 1e-8        # scaled_err(analytic, finite difference) per parameter tensor, floor:
                         # the largest analytic gradient entry over all parameters
FD_MAX_ELEMENTS = 20     # tensors larger than this are checked on a random subset this big

CONFIGS = tiny_configs()
CONFIG_IDS = [f"V{c.vocab_size}-D{c.d_model}-L{c.n_layers}-H{c.n_heads}-kv{c.n_kv_heads}"
              f"-dh{c.head_dim}-F{c.ffn_dim}" for c in CONFIGS]
SHAPES = [(2, 5), (3, 7), (2, 5), (2, 9)]    # (B, T) per config: B > 1, odd T


def batch(cfg, B, T, seed):
    """Random tokens and targets, with a few ignored targets (-1 and -100)."""
    tokens = random_tokens(cfg, B, T, seed)
    targets = random_tokens(cfg, B, T, seed + 1)
    targets[0, 1] = -1
    targets[B - 1, T - 1] = -100
    return tokens, targets


# --------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("k", range(len(CONFIGS)), ids=CONFIG_IDS)
def test_gradients_match_finite_differences(k):
    cfg, (B, T) = CONFIGS[k], SHAPES[k]
    assert cfg.z_loss >= 1e-2  # so that the z-loss term is visible in the gradients
    params = random_params(cfg, seed=k)
    tokens, targets = batch(cfg, B, T, seed=100 + k)
    out = ref.loss_and_grads(params, cfg, tokens, targets)
    assert out["tokens"] == B * T - 2
    assert set(out["grads"]) == set(cfg.param_shapes())

    def loss_at(name, index, value):
        w = params[name].copy()
        w.flat[index] = value
        return ref.loss_and_grads({**params, name: w}, cfg, tokens, targets)["loss"]

    rng = np.random.default_rng(1000 + k)
    floor = max_abs(out["grads"])    # a sampled subset of one tensor's gradient can be ~0
    for name, shape in cfg.param_shapes().items():
        grad = out["grads"][name]
        assert grad.shape == shape and grad.dtype == np.float64, name
        size = math.prod(shape)
        indices = (np.arange(size) if size <= FD_MAX_ELEMENTS
                   else rng.choice(size, FD_MAX_ELEMENTS, replace=False))
        fd = np.array([(loss_at(name, i, params[name].flat[i] + FD_EPS)
                        - loss_at(name, i, params[name].flat[i] - FD_EPS)) / (2 * FD_EPS)
                       for i in indices])
        err = scaled_err(grad.flat[indices], fd, floor=floor)
        assert err <= FD_REL_TOL, f"{name}: err {err:.2e} > {FD_REL_TOL:.0e}"


def test_z_loss_changes_the_gradient():
    """The z-loss term is in the loss and in every gradient (not only reported)."""
    cfg = CONFIGS[0]
    params = random_params(cfg, seed=3)
    tokens, targets = batch(cfg, 2, 5, seed=4)
    with_z = ref.loss_and_grads(params, cfg, tokens, targets)
    without = ref.loss_and_grads(params, dataclasses.replace(cfg, z_loss=0.0), tokens, targets)
    assert with_z["ce"] == pytest.approx(without["ce"], rel=1e-14)
    assert without["loss"] == pytest.approx(without["ce"], rel=1e-14)
    # a lower bound: a floor keeps it from passing by dividing by a ~0 gradient
    floor = max_abs(without["grads"])
    for name in cfg.param_shapes():
        assert scaled_err(with_z["grads"][name], without["grads"][name], floor=floor) > 1e-4, name


# --------------------------------------------------------------------------- forward pass

def naive_logits(p, cfg, tokens):
    """The spec's forward pass, one position and one head at a time (independent of ref)."""
    B, T = tokens.shape
    D, H, dh = cfg.d_model, cfg.n_heads, cfg.head_dim
    G = cfg.n_heads // cfg.n_kv_heads

    def ln(x, g):
        mu = x.sum() / D
        var = ((x - mu) ** 2).sum() / D
        return (x - mu) / math.sqrt(var + cfg.norm_eps) * g

    def rope(x, pos):
        out = np.empty(dh)
        for i in range(dh // 2):
            th = pos * cfg.rope_base ** (-2 * i / dh)
            out[i] = x[i] * math.cos(th) - x[i + dh // 2] * math.sin(th)
            out[i + dh // 2] = x[i + dh // 2] * math.cos(th) + x[i] * math.sin(th)
        return out

    logits = np.zeros((B, T, cfg.vocab_size))
    for b in range(B):
        x = [p["embed"][tokens[b, t]].copy() for t in range(T)]
        for layer in range(cfg.n_layers):
            w = {n.split(".", 2)[2]: v for n, v in p.items() if n.startswith(f"layers.{layer}.")}
            h = [ln(x[t], w["norm.scale"]) for t in range(T)]
            q = [h[t] @ w["attn.wq"] for t in range(T)]
            k = [h[t] @ w["attn.wk"] for t in range(T)]
            v = [h[t] @ w["attn.wv"] for t in range(T)]
            new_x = []
            for i in range(T):
                heads = []
                for j in range(H):
                    kv = j // G
                    qi = rope(q[i][j * dh:(j + 1) * dh], i)
                    s = np.array([qi @ rope(k[t][kv * dh:(kv + 1) * dh], t) / math.sqrt(dh)
                                  for t in range(i + 1)])
                    a = np.exp(s - s.max())
                    a /= a.sum()
                    heads.append(sum(a[t] * v[t][kv * dh:(kv + 1) * dh] for t in range(i + 1)))
                attn = np.concatenate(heads) @ w["attn.wo"]
                gate = h[i] @ w["mlp.w_gate"]
                mlp = (gate / (1 + np.exp(-gate)) * (h[i] @ w["mlp.w_up"])) @ w["mlp.w_down"]
                new_x.append(x[i] + attn + mlp)
            x = new_x
        for t in range(T):
            logits[b, t] = ln(x[t], p["final_norm.scale"]) @ p["embed"].T / math.sqrt(D)
    return logits


@pytest.mark.parametrize("k", range(len(CONFIGS)), ids=CONFIG_IDS)
def test_forward_matches_naive_loops(k):
    cfg = CONFIGS[k]
    params = random_params(cfg, seed=20 + k)
    tokens = random_tokens(cfg, 2, 5, seed=30 + k)
    z = ref.forward(params, cfg, tokens)
    assert z.shape == (2, 5, cfg.vocab_size) and z.dtype == np.float64
    assert scaled_err(z, naive_logits(params, cfg, tokens), floor=1.0) <= 1e-12


def test_grouped_attention_equals_multi_head_with_shared_kv():
    """Hkv = 2 of H = 4 is multi-head attention whose heads 0,1 / 2,3 share k and v."""
    gqa = PaLMConfig(vocab_size=19, d_model=8, n_layers=2, n_heads=4, n_kv_heads=2,
                     head_dim=4, ffn_dim=12, max_seq_len=8)
    mha = dataclasses.replace(gqa, n_kv_heads=4)
    params = random_params(gqa, seed=5)
    tiled = dict(params)
    for i in range(gqa.n_layers):
        for w in ("wk", "wv"):
            blocks = np.split(params[f"layers.{i}.attn.{w}"], 2, axis=1)   # per kv head
            tiled[f"layers.{i}.attn.{w}"] = np.concatenate(
                [blocks[j // 2] for j in range(4)], axis=1)
    tokens = random_tokens(gqa, 2, 7, seed=6)
    assert scaled_err(ref.forward(tiled, mha, tokens), ref.forward(params, gqa, tokens), floor=1.0) <= 1e-13


def test_forward_is_causal():
    cfg = CONFIGS[0]
    params = random_params(cfg, seed=7)
    tokens = random_tokens(cfg, 2, 7, seed=8)
    z = ref.forward(params, cfg, tokens)
    for t in range(7):
        changed = tokens.copy()
        changed[:, t] = (changed[:, t] + 1) % cfg.vocab_size
        z2 = ref.forward(params, cfg, changed)
        assert scaled_err(z2[:, :t], z[:, :t], floor=1.0) <= 1e-13
        assert np.abs(z2[:, t:] - z[:, t:]).min(axis=-1).max() > 0  # later logits do move


def test_loss_matches_logits():
    """loss, ce and tokens follow the spec's formulas applied to forward()'s logits."""
    cfg = CONFIGS[1]
    params = random_params(cfg, seed=9)
    tokens, targets = batch(cfg, 3, 5, seed=10)
    z = ref.forward(params, cfg, tokens)
    counted = targets >= 0
    lse = np.log(np.exp(z).sum(axis=-1))
    ce = lse - np.take_along_axis(z, np.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    out = ref.loss_and_grads(params, cfg, tokens, targets)
    assert out["tokens"] == counted.sum() == 13
    assert out["ce"] == pytest.approx(ce[counted].mean(), rel=1e-12)
    assert out["loss"] == pytest.approx((ce + cfg.z_loss * lse ** 2)[counted].mean(), rel=1e-12)


def test_all_targets_ignored_gives_zeros():
    cfg = CONFIGS[0]
    params = random_params(cfg, seed=11)
    tokens = random_tokens(cfg, 2, 3, seed=12)
    out = ref.loss_and_grads(params, cfg, tokens, np.full((2, 3), -1))
    assert out["loss"] == 0.0 and out["ce"] == 0.0 and out["tokens"] == 0
    for name, shape in cfg.param_shapes().items():
        assert out["grads"][name].shape == shape
        assert not out["grads"][name].any(), name


def test_float32_params_are_accepted():
    cfg = CONFIGS[2]
    params = random_params(cfg, seed=13)
    as32 = {n: w.astype(np.float32) for n, w in params.items()}
    back = {n: w.astype(np.float64) for n, w in as32.items()}
    tokens = random_tokens(cfg, 1, 4, seed=14)
    z = ref.forward(as32, cfg, tokens)
    assert z.dtype == np.float64
    np.testing.assert_array_equal(z, ref.forward(back, cfg, tokens))


def test_bad_inputs_raise():
    cfg = CONFIGS[0]
    params = random_params(cfg, seed=15)
    tokens = random_tokens(cfg, 2, 3, seed=16)
    with pytest.raises(ValueError, match="shape"):
        ref.forward({**params, "layers.0.attn.wk": np.zeros((12, 8))}, cfg, tokens)
    with pytest.raises(ValueError, match="missing"):
        ref.forward({n: w for n, w in params.items() if n != "final_norm.scale"}, cfg, tokens)
    with pytest.raises(ValueError, match="unknown"):
        ref.forward({**params, "lm_head": np.zeros((1,))}, cfg, tokens)
    with pytest.raises(ValueError, match="out of range"):
        ref.forward(params, cfg, np.array([[0, cfg.vocab_size]]))
    with pytest.raises(ValueError, match="out of range"):
        ref.forward(params, cfg, np.array([[0, -1]]))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        ref.forward(params, cfg, np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="targets shape"):
        ref.loss_and_grads(params, cfg, tokens, tokens[:, :2])
    with pytest.raises(ValueError, match="out of range"):
        ref.loss_and_grads(params, cfg, tokens, np.full((2, 3), cfg.vocab_size))


# --------------------------------------------------------------------------- pieces by hand

def test_rope_by_hand():
    rng = np.random.default_rng(17)
    dh, T = 6, 5
    theta = ref.rope_angles(T, dh, 10000.0)
    # theta[p, i] = p * 10000^(-2i/6)
    np.testing.assert_allclose(theta[3], 3 * np.array([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3)]))
    x = rng.standard_normal((2, T, 3, dh))
    y = ref.rope_forward(x, theta)
    np.testing.assert_array_equal(y[:, 0], x[:, 0])                      # position 0: identity
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1),
                               rtol=1e-14)                               # a rotation
    # rotate-half pairs (x_i, x_{i + dh/2}): e_0 at angle theta -> cos e_0 + sin e_3
    e0 = np.zeros((1, T, 1, dh))
    e0[..., 0] = 1.0
    r = ref.rope_forward(e0, theta)[0, 2, 0]
    np.testing.assert_allclose(r, [math.cos(2), 0, 0, math.sin(2), 0, 0], atol=1e-15)
    # backward is the transpose: <rope(x), d> == <x, rope_backward(d)>
    d = rng.standard_normal(x.shape)
    # floor: the summands' size (a dot product of random vectors can cancel to ~0)
    assert scaled_err(np.vdot(y, d), np.vdot(x, ref.rope_backward(d, theta)),
                      floor=np.abs(y * d).sum()) <= 1e-13


def test_layernorm_by_hand():
    rng = np.random.default_rng(18)
    x = 3.0 + 2.0 * rng.standard_normal((4, 10))
    eps = 1e-5
    y, _ = ref.layernorm_forward(x, np.ones(10), eps)
    var = x.var(axis=-1)                                                # biased variance
    np.testing.assert_allclose(y.mean(axis=-1), 0.0, atol=1e-14)
    np.testing.assert_allclose(y.var(axis=-1), var / (var + eps), rtol=1e-13)   # ~1
    np.testing.assert_allclose(y.var(axis=-1), 1.0, rtol=1e-4)  # eps / var ~ 1e-5
    g = rng.standard_normal(10)
    # floor max|g|: y has unit variance; an element of y · g near 0 is not divided by itself
    assert scaled_err(ref.layernorm_forward(x, g, eps)[0], y * g, floor=max_abs(g)) <= 1e-14


def test_silu_and_cross_entropy_pieces():
    u = np.array([-800.0, -2.0, 0.0, 1.5, 800.0])
    got = ref.silu(u)
    assert np.all(np.isfinite(got)) and got[0] <= 0 and got[-1] == 800.0
    # floor 1, the unit of u: silu(-800) ~ -1e-301 is compared as ~0, not relative to itself
    assert scaled_err(got, u / (1 + np.exp(-np.clip(u, -700, 700))), floor=1.0) <= 1e-15
    # one position, uniform logits over V = 4: lse = log 4, ce = log 4
    loss, ce, n, _ = ref.cross_entropy_forward(np.zeros((1, 1, 4)), np.array([[2]]), 0.5)
    assert n == 1 and ce == pytest.approx(math.log(4))
    assert loss == pytest.approx(math.log(4) + 0.5 * math.log(4) ** 2)


# --------------------------------------------------------------------------- helpers

def test_helpers():
    cfg = CONFIGS[0]
    a, b = random_params(cfg, seed=1), random_params(cfg, seed=1)
    assert all(np.array_equal(a[n], b[n]) for n in a)
    assert not np.array_equal(a["embed"], random_params(cfg, seed=2)["embed"])
    assert a["layers.0.norm.scale"].std() > 0.05 and abs(a["final_norm.scale"].mean() - 1) < 0.2
    assert abs(a["embed"].std() - 1.0) < 0.1
    assert abs(a["layers.0.mlp.w_down"].std() * math.sqrt(cfg.ffn_dim) - 1.0) < 0.2
    t = random_tokens(cfg, 3, 4, seed=1)
    assert t.dtype == np.int64 and t.shape == (3, 4) and 0 <= t.min() and t.max() < cfg.vocab_size
    kv = {c.n_kv_heads for c in CONFIGS}
    assert 1 in kv and any(1 < c.n_kv_heads < c.n_heads for c in CONFIGS)
    assert any(c.n_kv_heads == c.n_heads for c in CONFIGS)
    assert any(c.head_dim * c.n_heads != c.d_model for c in CONFIGS)
