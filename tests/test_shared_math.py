"""The per-element math both backends share (csrc/palmcore/math/*.h), through the test-only
bindings in _core.kernels, against NumPy float64 and palmcore.reference:

  exp_approx        relative error < 3e-7 on [-87, 88]; -inf and x < -87 give 0, x > 88 gives
                    +inf, NaN stays NaN
  silu, silu_grad   error < 1e-6 of the size of the terms they are computed from (x·σ(x), and
                    σ(x)(1 + |x|(1 - σ(x))) for silu' whose sum cancels near x = -1.28)
  rope_angle        exactly p · base^(-2i/dh) in double
  philox4x32        equal to palmcore.reference.philox4x32

and the CPU kernels (swiglu, rope) bit for bit against the shared per-element functions, odd
sizes included (vector and remainder loops), with 1 and 2 threads. On a CUDA device the same
functions run in a CUDA kernel and must give the CPU's bits.
"""

from __future__ import annotations

import numpy as np
import pytest

import palmcore
from palmcore import _core
from palmcore import reference as ref

K = _core.kernels


def sigmoid64(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_exp_approx_relative_error():
    x = np.concatenate([np.linspace(-87.0, 88.0, 2_000_003, dtype=np.float32),
                        np.float32([-87.0, 88.0, 0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5])])
    y = K.exp_approx(x).astype(np.float64)
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(y - want) / want) < 3e-7


def test_exp_approx_special_values():
    x = np.float32([-np.inf, -1e30, -1000.0, -87.5, np.nextafter(np.float32(-87), np.float32(-88)),
                    np.inf, 1e30, 89.0, np.nextafter(np.float32(88), np.float32(89)), np.nan])
    y = K.exp_approx(x)
    assert np.all(y[:5] == 0.0) and not np.any(np.signbit(y[:5]))
    assert np.all(y[5:9] == np.inf)
    assert np.isnan(y[9])


def test_silu_and_its_gradient():
    x = np.concatenate([np.linspace(-80.0, 80.0, 400_001, dtype=np.float32),
                        np.float32([-1.2784645, 0.0, -0.0, 1e-20])])
    x64 = x.astype(np.float64)
    s = sigmoid64(x64)
    assert np.all(np.abs(K.silu(x) - x64 * s) <= 1e-6 * np.abs(x64 * s))
    grad = s * (1.0 + x64 * (1.0 - s))
    assert np.all(np.abs(K.silu_grad(x) - grad) <= 1e-6 * s * (1.0 + np.abs(x64) * (1.0 - s)))


def test_swiglu_elementwise_matches_the_formulas():
    rng = np.random.default_rng(0)
    g, u, d = (rng.standard_normal(10_000).astype(np.float32) * 4 for _ in range(3))
    out, dgate, dup = K.swiglu_elementwise(g, u, d)
    g64, u64, d64 = (a.astype(np.float64) for a in (g, u, d))
    s = sigmoid64(g64)
    assert np.allclose(out, g64 * s * u64, rtol=2e-6, atol=0)
    assert np.allclose(dup, d64 * g64 * s, rtol=2e-6, atol=0)
    scale = np.abs(d64 * u64) * s * (1.0 + np.abs(g64) * (1.0 - s))   # the terms' size
    assert np.all(np.abs(dgate - d64 * u64 * s * (1.0 + g64 * (1.0 - s))) <= 2e-6 * scale)


def test_rope_angles_exact():
    for head_dim, base in ((12, 10000.0), (128, 10000.0), (64, 500000.0), (2, 3.5)):
        positions = [0, 1, 2, 7, 100, 4095, 131071]
        theta = K.rope_angles(positions, head_dim, base)
        want = np.array([[float(p) * base ** (-2.0 * i / head_dim) for i in range(head_dim // 2)]
                         for p in positions])
        assert np.array_equal(theta, want)


def test_philox_matches_reference():
    rng = np.random.default_rng(1)
    cases = [(0, (0, 0, 0, 0)), (2**64 - 1, (2**32 - 1,) * 4), (0x1234567890ABCDEF, (1, 2, 3, 4))]
    cases += [(int(rng.integers(0, 2**63)) * 2 + 1, tuple(int(v) for v in rng.integers(0, 2**32, 4)))
              for _ in range(200)]
    for key, counter in cases:
        assert K.philox(key, counter) == ref.philox4x32(key, counter)
    assert K.uniform01(5, 6, 7) == ref.uniform01(5, 6, 7)


@pytest.mark.usefixtures("threads")
@pytest.mark.parametrize("n", [1, 7, 16, 17, 1000, 4099])
def test_swiglu_kernels_run_the_shared_math(n):
    rng = np.random.default_rng(n)
    g = (rng.standard_normal(n) * 6).astype(np.float32)
    g[::5] = rng.choice(np.float32([-100.0, -87.5, -1.2784645, 0.0, 88.5, 100.0]), size=g[::5].size)
    u, d = (rng.standard_normal(n).astype(np.float32) for _ in range(2))
    out, dgate, dup = K.swiglu_elementwise(g, u, d)
    assert np.array_equal(K.swiglu_forward(g, u), out)
    kernel_dgate, kernel_dup = K.swiglu_backward(g, u, d)
    assert np.array_equal(kernel_dgate, dgate) and np.array_equal(kernel_dup, dup)


@pytest.mark.usefixtures("threads")
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("heads,head_dim", [(1, 2), (3, 12), (2, 38), (2, 64)])
def test_rope_kernel_runs_rotate_pair(heads, head_dim, inverse):
    rng = np.random.default_rng(head_dim)
    positions = rng.integers(0, 300, 9).astype(np.int32)
    half = head_dim // 2
    # Rotating (1, 0) gives the kernel's own table entries: (cos θ, ±sin θ), exactly.
    unit = np.zeros((9, heads * head_dim), np.float32)
    unit.reshape(9, heads, head_dim)[:, :, :half] = 1.0
    tables = K.rope_apply(unit, positions, heads, 10000.0, False).reshape(9, heads, head_dim)
    c, s = tables[:, :, :half], tables[:, :, half:] * (-1.0 if inverse else 1.0)
    x = rng.standard_normal((9, heads * head_dim)).astype(np.float32)
    x1, x2 = (np.ascontiguousarray(a) for a in (x.reshape(9, heads, head_dim)[:, :, :half],
                                                  x.reshape(9, heads, head_dim)[:, :, half:]))
    want1, want2 = K.rotate_pair(x1, x2, np.ascontiguousarray(c), np.ascontiguousarray(s))
    got = K.rope_apply(x.copy(), positions, heads, 10000.0, inverse).reshape(9, heads, head_dim)
    assert np.array_equal(got[:, :, :half], want1) and np.array_equal(got[:, :, half:], want2)


def special_inputs(n, seed):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.standard_normal(n) * 30, rng.standard_normal(n),
                        [-np.inf, np.inf, np.nan, -87.0, 88.0, -100.0, 100.0, 0.0, -0.0]]).astype(np.float32)
    return x, np.roll(x, 3)


def test_shared_math_rows_on_the_cpu():
    x, y = special_inputs(500, 2)
    rows = K.shared_math_rows(x, y)
    assert np.array_equal(rows[:, 0], K.exp_approx(x), equal_nan=True)
    assert np.array_equal(rows[:, 1], K.silu(x), equal_nan=True)
    assert np.array_equal(rows[:, 2], K.silu_grad(x), equal_nan=True)
    out, dgate, dup = K.swiglu_elementwise(x, y, np.full_like(x, 1.5))
    assert np.array_equal(rows[:, 3:6], np.stack([out, dgate, dup], 1), equal_nan=True)
    x1, x2 = K.rotate_pair(x.copy(), y.copy(), np.full_like(x, 0.8), np.full_like(x, 0.6))
    assert np.array_equal(rows[:, 6:8], np.stack([x1, x2], 1), equal_nan=True)
    words = [ref.philox4x32(int(a), (3, 0, int(b), 0))[0] for a, b in zip(x.view(np.uint32), y.view(np.uint32))]
    assert np.array_equal(rows[:, 8].view(np.uint32), np.array(words, np.uint32))


@pytest.mark.skipif(not palmcore.cuda_available(), reason="no CUDA device")
def test_shared_math_rows_on_the_gpu_give_the_cpu_bits():
    x, y = special_inputs(100_000, 3)
    cpu, gpu = K.shared_math_rows(x, y), K.shared_math_rows(x, y, "cuda")
    same = (cpu.view(np.uint32) == gpu.view(np.uint32)) | (np.isnan(cpu) & np.isnan(gpu))  # NaN payloads may differ
    assert same.all(), f"{np.count_nonzero(~same)} values differ, first at row {np.argwhere(~same)[0]}"
