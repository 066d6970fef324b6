"""Optimizer steps (C++) against the NumPy float64 formulas of palmcore.reference.

Each step feeds the C++ gradients to both sides; the NumPy side keeps its own parameters and
moments in float64. Error measure: helpers.scaled_err per tensor, <= 1e-5 after one step and
<= 1e-4 after five (float32 state drifts a little from float64). Floors: for parameters their
initial scale (the largest initial entry of the tensor); for the moments m and v the largest
entry of that moment over all tensors (a tensor's moment could be ~0 where its gradient is).
The returned gradient norm is compared relative to itself: it is the norm of the whole gradient
of a random model on random tokens, never near 0.
"""

from __future__ import annotations

import numpy as np
import pytest

import palmcore
from palmcore import reference as ref

from helpers import max_abs, random_params, random_tokens, scaled_err

CFG = palmcore.PaLMConfig(vocab_size=41, d_model=12, n_layers=2, n_heads=4, n_kv_heads=2,
                          head_dim=4, ffn_dim=20, max_seq_len=32)
OPTIMIZERS = {
    "adafactor": (lambda m: palmcore.Adafactor(m), ref.adafactor_update, {}),
    "adamw": (lambda m: palmcore.AdamW(m, weight_decay=0.1), ref.adamw_update, dict(weight_decay=0.1)),
}


def fresh_model(seed=0):
    model = palmcore.PaLM(CFG, seed=seed)
    model.load_state_dict({k: v.astype(np.float32) for k, v in random_params(CFG, seed).items()})
    return model


def batch(step):
    tokens = random_tokens(CFG, 2, 11, 100 + step)
    return tokens[:, :-1], tokens[:, 1:]


@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize("max_norm", [None, 1.0, 1e-3], ids=["noclip", "clip1", "clip-tight"])
def test_steps_match_numpy(kind, max_norm):
    make, update, settings = OPTIMIZERS[kind]
    model = fresh_model()
    opt = make(model)
    x = {k: v.astype(np.float64) for k, v in model.state_dict().items()}
    x_scale = {k: max_abs(v) for k, v in x.items()}   # the floor of each parameter tensor
    m = {k: np.zeros_like(v) for k, v in x.items()}
    v = {k: np.zeros_like(a) for k, a in x.items()}
    lr = 3e-2
    for step in range(1, 6):
        model.zero_grad()
        model.forward_backward(*batch(step))
        grads = {k: g.astype(np.float64) for k, g in model.grads().items()}
        norm = ref.global_norm(grads)
        scale = min(1.0, max_norm / norm) if max_norm else 1.0
        got_norm = opt.step(lr, max_grad_norm=max_norm)
        assert abs(got_norm - norm) <= 1e-6 * norm
        for name in x:
            x[name], m[name], v[name] = update(x[name], grads[name] * scale, m[name], v[name], step,
                                               lr, **settings)
        tol = 1e-5 if step == 1 else 1e-4
        got = model.state_dict()
        for name in x:
            assert scaled_err(got[name], x[name], floor=x_scale[name]) <= tol, (step, name)
    assert opt.steps_taken == 5
    state = opt.state_dict()
    for moment, want in (("m", m), ("v", v)):
        floor = max_abs(want)
        for name in x:
            assert scaled_err(state[moment][name], want[name], floor=floor) <= 1e-4, (moment, name)


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_same_bits_with_1_and_2_threads(kind):
    results = []
    old = palmcore.get_num_threads()
    try:
        for threads in (1, 2):
            palmcore.set_num_threads(threads)
            model = fresh_model()
            opt = OPTIMIZERS[kind][0](model)
            for step in range(1, 4):
                model.zero_grad()
                model.forward_backward(*batch(step))
                opt.step(1e-2)
            results.append(model.state_dict())
    finally:
        palmcore.set_num_threads(old)
    for name in results[0]:
        assert np.array_equal(results[0][name], results[1][name]), name


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_state_dict_resumes_exactly(kind):
    """4 steps straight == 2 steps, state saved into a new model and optimizer, 2 more."""
    make = OPTIMIZERS[kind][0]

    def run(model, opt, steps):
        for step in steps:
            model.zero_grad()
            model.forward_backward(*batch(step))
            opt.step(1e-2)

    straight = fresh_model()
    run(straight, make(straight), range(1, 5))

    first = fresh_model()
    first_opt = make(first)
    run(first, first_opt, range(1, 3))
    resumed = palmcore.PaLM(CFG, seed=7)
    resumed.load_state_dict(first.state_dict())
    resumed_opt = make(resumed)
    resumed_opt.load_state_dict(first_opt.state_dict())
    assert resumed_opt.steps_taken == 2
    run(resumed, resumed_opt, range(3, 5))
    for name, value in straight.state_dict().items():
        assert np.array_equal(resumed.state_dict()[name], value), name


def test_bad_arguments():
    model = fresh_model()
    opt = palmcore.Adafactor(model)
    with pytest.raises(ValueError, match=r"lr must be finite and >= 0, got -1.0"):
        opt.step(-1.0)
    with pytest.raises(TypeError, match=r"lr must be a number, got '0.1'"):
        opt.step("0.1")
    with pytest.raises(ValueError, match=r"max_grad_norm must be finite and > 0, got 0.0"):
        opt.step(1e-2, max_grad_norm=0.0)
    with pytest.raises(ValueError, match=r"grad_scale must be finite and > 0, got inf"):
        opt.step(1e-2, grad_scale=float("inf"))
    with pytest.raises(ValueError, match=r"beta1 must be finite, got nan"):
        palmcore.AdamW(model, betas=(float("nan"), 0.95))
    with pytest.raises(TypeError, match=r"model must be a palmcore.PaLM"):
        palmcore.Adafactor(object())
    with pytest.raises(ValueError, match=r"optimizer state is for 'adamw', not 'adafactor'"):
        opt.load_state_dict(palmcore.AdamW(model).state_dict())
    state = opt.state_dict()
    state["v"]["embed"] = state["v"]["embed"] * np.nan
    with pytest.raises(ValueError, match=r"optimizer state 'v' of 'embed' must be a finite float32"):
        opt.load_state_dict(state)
    assert opt.steps_taken == 0


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_accumulated_micro_batches_equal_one_batch(kind):
    """Two micro-batches of 2 rows with grad_scale 1/2 == one batch of 4 rows (same tokens)."""
    make = OPTIMIZERS[kind][0]
    tokens = random_tokens(CFG, 4, 11, 5)
    whole, parts = fresh_model(), fresh_model()
    whole.forward_backward(tokens[:, :-1], tokens[:, 1:])
    norm_whole = make(whole).step(1e-2)
    for rows in (slice(0, 2), slice(2, 4)):
        parts.forward_backward(tokens[rows, :-1], tokens[rows, 1:])
    norm_parts = make(parts).step(1e-2, grad_scale=0.5)
    assert abs(norm_parts - norm_whole) <= 1e-5 * norm_whole
    for name, value in whole.state_dict().items():
        assert scaled_err(parts.state_dict()[name], value, floor=max_abs(value)) <= 1e-5, name


def test_palm_schedule():
    lr = palmcore.schedules.palm()
    assert lr(1) == 1e-2 and lr(10000) == 1e-2
    for k in (10001, 40000, 10**6):
        assert lr(k) == pytest.approx(1e-2 * np.sqrt(10000 / k), rel=1e-12)
    short = palmcore.schedules.palm(peak=3e-3, constant_steps=7)
    assert short(7) == 3e-3 and short(28) == pytest.approx(1.5e-3, rel=1e-12)


def test_cosine_schedule():
    lr = palmcore.schedules.cosine(1e-3, warmup_steps=10, total_steps=110, floor=1e-5)
    assert lr(1) == pytest.approx(1e-4) and lr(10) == pytest.approx(1e-3)
    assert lr(60) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5, rel=1e-12)   # half way: cos = 0
    assert lr(110) == pytest.approx(1e-5) and lr(500) == pytest.approx(1e-5)
    rates = [lr(k) for k in range(10, 111)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_bad_schedules():
    with pytest.raises(ValueError, match=r"total_steps must exceed warmup_steps"):
        palmcore.schedules.cosine(1e-3, warmup_steps=10, total_steps=10)
    with pytest.raises(ValueError, match=r"the floor lr must be in \[0, peak\]"):
        palmcore.schedules.cosine(1e-3, warmup_steps=0, total_steps=10, floor=1e-2)
    with pytest.raises(ValueError, match=r"constant_steps must be >= 1"):
        palmcore.schedules.palm(constant_steps=0)
    with pytest.raises(ValueError, match=r"schedule steps count from 1"):
        palmcore.schedules.palm()(0)
    with pytest.raises(ValueError, match=r"grad_scale must be finite and > 0, got 0.0"):
        palmcore.Adafactor(fresh_model()).step(1e-2, grad_scale=0.0)
