"""The loss and optimizer ops (cross_entropy_stats / _backward / _sums, lse_combine, sum_squares,
adafactor_second_moment / _apply, adamw_update) on every available backend (the `device`
fixture: cpu, and cuda where a GPU is), each against the CPU float32 kernel and, where
palmcore.reference has the math, against it in float64.

Against the CPU kernel (the CUDA kernels run the CPU's order of operations with the shared
per-element math of palmcore/math/{exp,training}.h):
- bit-equal: cross_entropy_backward, cross_entropy_sums, sum_squares, adafactor_second_moment,
  adafactor_apply, adamw_update, and cross_entropy_stats' picked;
- cross_entropy_stats' lse: within 1 ulp of the lse (the one libm call, log of a double, is
  glibc's on the CPU and CUDA's on the device: the same to about 1 ulp of a double, which
  rounds to the same float all but once in ~2^28);
- lse_combine: relative 2^-20 of the result (to_shares, expf) or of |top| + |log lse| (back,
  logf): the CPU calls glibc's expf/logf, the device CUDA's (2 and 1 ulp at most).
Against the float64 reference: the bounds are stated at each assertion, relative to the scale
named there (exp_approx has a relative error below 3e-7; float32 rounding is 2^-24 ≈ 6e-8).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from palmcore import _core, reference

K = _core.kernels
ROWS = [1, 7, 33]
VOCABS = [1, 5, 257]
SIZES = [1, 1000, 100003]  # 100003: 13 chunks of 8192, the last one short


def same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


def ce_inputs(rows, vocab, first, seed):
    """Logits ~ 3·N(0, 1) and targets over [-2, first + vocab + 2): ignored (< 0) rows, targets
    in this shard, and targets in other shards (before `first` and after its end)."""
    rng = np.random.default_rng(seed)
    z = (3.0 * rng.standard_normal((rows, vocab))).astype(np.float32)
    y = rng.integers(-2, first + vocab + 2, rows).astype(np.int32)
    if rows > 1:
        y[0] = -1  # at least one ignored row
        y[1] = first + vocab // 2  # and one in this shard
    return z, y


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("first", [0, 3])
def test_cross_entropy_stats(device, rows, vocab, first):
    z, y = ce_inputs(rows, vocab, first, rows * 1000 + vocab + first)
    lse, picked = K.cross_entropy_stats_on(z, y, first, device)
    cpu_lse, cpu_picked = K.cross_entropy_stats_on(z, y, first, "cpu")
    same_bits(picked, cpu_picked)
    np.testing.assert_array_less(np.abs(lse.astype(np.float64) - cpu_lse), np.spacing(np.abs(cpu_lse)) * 1.01)
    # float64: lse = logsumexp(z) to 1e-6 of (1 + |lse|) (exp_approx 3e-7, float rounding of lse);
    # picked = z[y - first] exactly where the target is in the shard, else 0
    z64 = z.astype(np.float64)
    want = reference.logsumexp(z64)
    assert np.all(np.abs(lse - want) <= 1e-6 * (1.0 + np.abs(want)))
    col = y.astype(np.int64) - first
    inside = (y >= 0) & (col >= 0) & (col < vocab)
    want_picked = np.where(inside, z[np.arange(rows), np.clip(col, 0, vocab - 1)], np.float32(0.0))
    same_bits(picked, want_picked.astype(np.float32))


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("first", [0, 3])
def test_cross_entropy_backward(device, rows, vocab, first):
    z, y = ce_inputs(rows, vocab, first, 7 + rows * 1000 + vocab + first)
    lse = reference.logsumexp(z.astype(np.float64)).astype(np.float32)  # the row's full lse
    z_loss, grad_scale = 1e-2, 0.37
    dz = K.cross_entropy_backward_on(z, y, first, lse, z_loss, grad_scale, device)
    same_bits(dz, K.cross_entropy_backward_on(z, y, first, lse, z_loss, grad_scale, "cpu"))
    # float64: dz = gs · (exp(z - lse) · (1 + 2 z_loss lse) - onehot(y - first)), 0 on ignored
    # rows; |error| <= 1e-6 · gs · |1 + 2 z_loss lse| + 2^-23 · gs (scale: the row's coefficient;
    # exp_approx 3e-7 plus the roundings of z - lse, the product and the subtraction)
    lse64 = lse.astype(np.float64)
    coef = grad_scale * (1.0 + 2.0 * z_loss * lse64)
    want = np.exp(z.astype(np.float64) - lse64[:, None]) * coef[:, None]
    col = y.astype(np.int64) - first
    for r in range(rows):
        if y[r] < 0:
            want[r] = 0.0
        elif 0 <= col[r] < vocab:
            want[r, col[r]] -= grad_scale
    bound = 1e-6 * np.abs(coef)[:, None] + 2.0**-23 * grad_scale
    assert np.all(np.abs(dz - want) <= bound)
    assert not dz[y < 0].any()


def test_lse_combine(device):
    rng = np.random.default_rng(5)
    top = (10.0 * rng.standard_normal(1001)).astype(np.float32)
    lse = top - np.abs(5.0 * rng.standard_normal(1001)).astype(np.float32)
    shares = K.lse_combine_on(lse, top, False, device)
    cpu_shares = K.lse_combine_on(lse, top, False, "cpu")
    assert np.all(np.abs(shares.astype(np.float64) - cpu_shares) <= 2.0**-20 * np.abs(cpu_shares))
    # float64: exp of the float32 difference, to 2^-22 relative
    want = np.exp((lse - top).astype(np.float64))
    assert np.all(np.abs(shares - want) <= 2.0**-22 * want)
    summed = (shares * np.float32(1.5)).astype(np.float32)  # as if two shards
    full = K.lse_combine_on(summed, top, True, device)
    cpu_full = K.lse_combine_on(summed, top, True, "cpu")
    scale = np.abs(top) + np.abs(np.log(summed.astype(np.float64)))
    assert np.all(np.abs(full.astype(np.float64) - cpu_full) <= 2.0**-20 * scale)
    want = top.astype(np.float64) + np.log(summed.astype(np.float64))
    assert np.all(np.abs(full - want) <= 2.0**-22 * scale)


@pytest.mark.parametrize("rows", ROWS)
def test_cross_entropy_sums(device, rows):
    rng = np.random.default_rng(rows)
    lse = (5.0 + rng.standard_normal(rows)).astype(np.float32)
    picked = rng.standard_normal(rows).astype(np.float32)
    y = rng.integers(-1, 9, rows).astype(np.int32)
    sums0 = np.array([0.25, -1.5], dtype=np.float64)  # accumulated into, not overwritten
    sums = K.cross_entropy_sums_on(lse, picked, y, 1e-4, sums0, device)
    same_bits(sums, K.cross_entropy_sums_on(lse, picked, y, 1e-4, sums0, "cpu"))
    # float64 (the same terms, any order): 1e-13 relative to Σ|terms|
    keep = y >= 0
    ce = lse[keep].astype(np.float64) - picked[keep]
    with_z = ce + 1e-4 * lse[keep].astype(np.float64) ** 2
    want = sums0 + [math.fsum(ce), math.fsum(with_z)]
    scale = np.abs(sums0) + [np.abs(ce).sum(), np.abs(with_z).sum()]
    assert np.all(np.abs(sums - want) <= 1e-13 * scale)


@pytest.mark.parametrize("vocab", [5, 257])
def test_cross_entropy_sharded_pipeline_matches_reference(device, vocab):
    """Two vocabulary shards (first = 0 and first = the cut), combined with lse_combine as the
    model does, then the sums: equal to the unsharded loss of reference.cross_entropy_forward."""
    rows, cut, z_loss = 33, vocab // 2 + 1, 1e-3
    z, y = ce_inputs(rows, vocab, 0, vocab)
    y = np.where(y >= vocab, vocab - 1, y).astype(np.int32)
    parts = [K.cross_entropy_stats_on(np.ascontiguousarray(z[:, :cut]), y, 0, device),
             K.cross_entropy_stats_on(np.ascontiguousarray(z[:, cut:]), y, cut, device)]
    top = np.maximum(parts[0][0], parts[1][0])
    shares = [K.lse_combine_on(p[0], top, False, device) for p in parts]
    lse = K.lse_combine_on((shares[0] + shares[1]).astype(np.float32), top, True, device)
    picked = (parts[0][1] + parts[1][1]).astype(np.float32)  # one of the two is 0
    sums = K.cross_entropy_sums_on(lse, picked, y, z_loss, np.zeros(2), device)
    loss, ce, n, _ = reference.cross_entropy_forward(z.astype(np.float64), y, z_loss)
    assert n == int((y >= 0).sum()) and n > 0
    # per row |lse error| <= 1e-6 (1 + |lse|): relative 2e-6 of the mean loss's scale
    scale = 1.0 + np.abs(lse[y >= 0]).mean() * (1.0 + 2.0 * z_loss * np.abs(lse).max())
    assert abs(sums[0] / n - ce) <= 2e-6 * scale
    assert abs(sums[1] / n - loss) <= 2e-6 * scale


@pytest.mark.parametrize("n", SIZES)
def test_sum_squares(device, n):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    sums0 = np.full(3, 7.0)
    sums = K.sum_squares_on(x, sums0, 1, device)
    same_bits(sums, K.sum_squares_on(x, sums0, 1, "cpu"))
    assert sums[0] == 7.0 and sums[2] == 7.0  # only sums[index] is written
    # float64: 1e-13 relative (x² is exact in double; n additions of relative 2^-53 each)
    assert abs(sums[1] - math.fsum(x.astype(np.float64) ** 2)) <= 1e-13 * sums[1]


def optimizer_inputs(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    m = (0.1 * rng.standard_normal(n)).astype(np.float32)
    v = np.abs(rng.standard_normal(n)).astype(np.float32) + np.float32(0.01)
    return x, g, m, v


def assert_near(got, want, scale, rel):
    """|got - want| <= rel · scale, element by element."""
    err = np.abs(got.astype(np.float64) - want)
    assert np.all(err <= rel * scale), f"worst {np.max(err / scale)} of the scale, allowed {rel}"


@pytest.mark.parametrize("n", SIZES)
def test_adafactor(device, n):
    x, g, m, v = optimizer_inputs(n, n + 1)
    step, lr, gs = 3, 0.05, 0.5
    sums0 = np.full(4, -1.0)
    v1, sums = K.adafactor_second_moment_on(x, g, v, step, gs, sums0, 1, device, clip=0.5)
    cpu_v1, cpu_sums = K.adafactor_second_moment_on(x, g, v, step, gs, sums0, 1, "cpu", clip=0.5)
    same_bits(v1, cpu_v1)
    same_bits(sums, cpu_sums)
    assert sums[0] == -1.0 and sums[3] == -1.0
    rms_u, rms_x = math.sqrt(sums[1] / n), math.sqrt(sums[2] / n)
    x1, m1 = K.adafactor_apply_on(x, g, m, v1, lr, gs, rms_u, rms_x, device, clip=0.5)
    cpu_x1, cpu_m1 = K.adafactor_apply_on(x, g, m, v1, lr, gs, rms_u, rms_x, "cpu", clip=0.5)
    same_bits(x1, cpu_x1)
    same_bits(m1, cpu_m1)
    # float64 reference (clip 0.5 so that the clipping acts)
    X, G, M, V = (a.astype(np.float64) for a in (x, g, m, v))
    want_x, want_m, want_v = reference.adafactor_update(X, G * gs, M, V, step, lr, clip=0.5)
    assert_near(v1, want_v, want_v, 4e-7)  # relative to v: a few float32 roundings
    # RMS sums: relative 1e-6 (u carries v's and the division's roundings)
    u = G * gs / np.sqrt(want_v)
    assert abs(sums[1] - np.sum(u * u)) <= 1e-6 * np.sum(u * u)
    assert abs(sums[2] - math.fsum(X * X)) <= 1e-13 * sums[2]
    # m: relative 2e-6 of |β1 m| + |(1 - β1) u / clip_div| (the terms it sums)
    clip_div = max(1.0, math.sqrt(np.mean(u * u)) / 0.5)
    m_terms = 0.9 * np.abs(M) + 0.1 * np.abs(u) / clip_div
    assert_near(m1, want_m, m_terms, 2e-6)
    # x: 2^-22 of |x| (its own roundings) + 2^-22 · 8 of the update's scale, lr · max(min_scale,
    # RMS(x)) · m_terms (m's error carried over: m itself may cancel)
    step_scale = lr * max(1e-3, math.sqrt(np.mean(X * X))) * m_terms
    assert_near(x1, want_x, np.abs(X) + 8.0 * step_scale, 2.0**-22)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw(device, n, weight_decay):
    x, g, m, v = optimizer_inputs(n, n + 2)
    step, lr, gs = 4, 0.01, 0.75
    out = K.adamw_update_on(x, g, m, v, step, lr, gs, device, weight_decay=weight_decay)
    for got, cpu in zip(out, K.adamw_update_on(x, g, m, v, step, lr, gs, "cpu", weight_decay=weight_decay)):
        same_bits(got, cpu)
    X, G, M, V = (a.astype(np.float64) for a in (x, g, m, v))
    want_x, want_m, want_v = reference.adamw_update(X, G * gs, M, V, step, lr, weight_decay=weight_decay)
    x1, m1, v1 = out
    # m, v: relative 4e-7 of the terms they sum
    assert_near(m1, want_m, 0.9 * np.abs(M) + 0.1 * np.abs(G * gs), 4e-7)
    assert_near(v1, want_v, 0.95 * V + 0.05 * (G * gs) ** 2, 4e-7)
    # x: 2^-22 of |x| (its own roundings) + 2^-22 · 8 of the update's scale, lr · (the terms of
    # m) · m_hat / (sqrt(v · v_hat) + eps) (m's error carried over: m itself may cancel)
    m_hat, v_hat = 1.0 / (1.0 - 0.9**step), 1.0 / (1.0 - 0.95**step)
    step_scale = lr * (0.9 * np.abs(M) + 0.1 * np.abs(G * gs)) * m_hat / (np.sqrt(want_v * v_hat) + 1e-8)
    assert_near(x1, want_x, np.abs(X) + 8.0 * step_scale, 2.0**-22)


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
@pytest.mark.parametrize("optimizer", ["adafactor", "adamw"])
def test_the_update_writes_the_rounded_copy_in_the_same_pass(device, storage, optimizer):
    """With the bf16 mode's GEMM copy given, the update also writes R(x_new) into it (float32
    holding the bf16 value, or bf16 bits), every element, and x, m, v are what they are without it."""
    from test_backend_ops import from_bf16_bits, to_bf16_bits

    n = 1037
    x, g, m, v = optimizer_inputs(n, 5)
    if optimizer == "adamw":
        plain = K.adamw_update_on(x, g, m, v, 3, 0.01, 0.75, device)
        *state, copy = K.adamw_update_on(x, g, m, v, 3, 0.01, 0.75, device, rounded=storage)
    else:
        plain = K.adafactor_apply_on(x, g, m, np.abs(v) + 0.1, 0.01, 0.75, 0.9, 0.5, device)
        *state, copy = K.adafactor_apply_on(x, g, m, np.abs(v) + 0.1, 0.01, 0.75, 0.9, 0.5, device, rounded=storage)
    for a, b in zip(state, plain):
        same_bits(a, b)
    x1 = plain[0]
    assert not np.array_equal(x1, x)
    if storage == "bfloat16":
        np.testing.assert_array_equal(copy, to_bf16_bits(x1))
    else:
        same_bits(copy, from_bf16_bits(to_bf16_bits(x1)))
