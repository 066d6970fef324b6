"""PALM_SPEC "Sparse activation" in the float64 reference and the config (issue 13): the
sparse MLP's gradients (router through the renormalised weights, experts, the balance and
router z-losses) against finite differences; top-k = E is the dense mixture of all experts;
parameter counts; config checks."""

from __future__ import annotations

import numpy as np
import pytest

import palmcore
from palmcore import reference as ref

from helpers import random_params, random_tokens

CFG = palmcore.PaLMConfig(vocab_size=31, d_model=12, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=6, ffn_dim=16,
                          max_seq_len=32, n_experts=4, expert_top_k=2, expert_ffn_dim=10, moe_every=1, z_loss=1e-2,
                          router_aux_loss=0.3, router_z_loss=0.2)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_gradients_match_finite_differences(k):
    """Central differences (eps 1e-6) of the whole loss, relative error below 1e-5 at random
    coordinates of every kind of parameter (the routing choice is locally constant)."""
    cfg = palmcore.PaLMConfig(**{**CFG.to_dict(), "expert_top_k": k})
    params = random_params(cfg, k)
    tokens = random_tokens(cfg, 2, 9, seed=k)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    grads = ref.loss_and_grads(params, cfg, inputs, targets)["grads"]
    rng = np.random.default_rng(k)
    for name in ("layers.0.mlp.router", "layers.1.mlp.experts.w_gate", "layers.0.mlp.experts.w_up",
                 "layers.1.mlp.experts.w_down", "layers.0.attn.wk", "layers.1.norm.scale", "embed"):
        for _ in range(2):
            idx = tuple(int(rng.integers(0, s)) for s in grads[name].shape)
            moved = {n: w.astype(np.float64).copy() for n, w in params.items()}
            moved[name][idx] += 1e-6
            up = ref.loss_and_grads(moved, cfg, inputs, targets)["loss"]
            moved[name][idx] -= 2e-6
            down = ref.loss_and_grads(moved, cfg, inputs, targets)["loss"]
            fd = (up - down) / 2e-6
            assert abs(grads[name][idx] - fd) <= 1e-5 * max(abs(fd), 1e-3), (name, idx, grads[name][idx], fd)


def test_top_k_equal_to_e_is_the_dense_mixture():
    """k = E: every token mixes every expert with the router's softmax weights."""
    cfg = palmcore.PaLMConfig(**{**CFG.to_dict(), "expert_top_k": 4})
    p = {n: w.astype(np.float64) for n, w in random_params(cfg, 3).items()}
    h = np.random.default_rng(0).standard_normal((7, cfg.d_model))
    layer = {n[len("layers.0."):]: w for n, w in p.items() if n.startswith("layers.0.")}
    got, _, _, _ = ref.moe_forward(h, layer, 4)
    pr = ref.softmax(h @ layer["mlp.router"])
    want = sum(pr[:, e:e + 1] * ref.swiglu_forward(h, layer["mlp.experts.w_gate"][e], layer["mlp.experts.w_up"][e],
                                                   layer["mlp.experts.w_down"][e])[0] for e in range(4))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_ties_go_to_the_lower_expert():
    cfg = palmcore.PaLMConfig(**{**CFG.to_dict(), "expert_top_k": 1})
    layer = {n[len("layers.0."):]: w.astype(np.float64) for n, w in random_params(cfg, 4).items()
             if n.startswith("layers.0.")}
    layer["mlp.router"][:] = 0.0  # every expert equally likely: expert 0 for everyone
    _, balance, _, cache = ref.moe_forward(np.ones((3, cfg.d_model)), layer, 1)
    assert (cache[4] == 0).all() and balance == pytest.approx(cfg.n_experts * 1.0 * 0.25)


def test_parameter_counts_and_the_seed_moe_preset():
    cfg = palmcore.PaLMConfig.preset("seed-moe")
    assert (cfg.n_experts, cfg.expert_top_k, cfg.moe_every, cfg.expert_ffn_dim) == (8, 2, 2, 1024)
    assert [cfg.is_sparse(i) for i in range(6)] == [False, True] * 3
    shapes = cfg.param_shapes()
    assert shapes["layers.1.mlp.experts.w_down"] == (8, 1024, 256) and "layers.0.mlp.w_gate" in shapes
    assert cfg.num_params() == sum(int(np.prod(s)) for s in shapes.values())
    dense = palmcore.PaLMConfig.preset("seed")
    expert_mlp = 3 * 256 * 1024
    assert cfg.num_params() == dense.num_params() + 3 * (7 * expert_mlp + 256 * 8)
    assert cfg.num_active_params() == dense.num_params() + 3 * (expert_mlp + 256 * 8)
    assert cfg.flops_per_token(256) - dense.flops_per_token(256) == 6 * 3 * (expert_mlp + 256 * 8)
    assert dense.num_active_params() == dense.num_params()


@pytest.mark.parametrize("fields,match", [
    (dict(n_experts=4, expert_top_k=5), r"expert_top_k \(5\) must be at most n_experts \(4\)"),
    (dict(n_experts=4, expert_top_k=0), "expert_top_k"),
    (dict(n_experts=-1), "n_experts"),
    (dict(n_experts=4, moe_every=0), "moe_every"),
    (dict(n_experts=4, router_aux_loss=-1.0), "router_aux_loss"),
])
def test_bad_moe_configs(fields, match):
    with pytest.raises(ValueError, match=match):
        palmcore.PaLMConfig(**{**CFG.to_dict(), **fields})
