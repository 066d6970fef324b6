"""The ops one by one on every available backend (the `device` fixture: cpu, and cuda where a
GPU is), against NumPy in float64 on the same (bf16-rounded) inputs.

Tolerance: a float32 product over k terms has a relative error of about k · 2^-24 of the sum of
|terms|; 1e-5 relative to Σ|a_ik b_kj| covers k up to ~100 with room (cuBLASLt may split k
differently from OpenBLAS, so the two differ in the last bits, not more). bf16 inputs are
exact in float32, so the bf16 products get the same bound on the rounded inputs.
Copies and conversions are exact: compared bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest

from palmcore import _core

SHAPES = [(1, 1, 1), (7, 13, 5), (33, 65, 17)]  # (m, k, n)
GUARD = 16  # NaN-filled elements either side of C in the kernel's output buffer


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even (NaN kept a quiet NaN): PALM_SPEC's rounding."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), rounded)


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def special_values(rng, n: int) -> np.ndarray:
    """Random float32s with ties, subnormals, infinities, NaN and values that round up to inf."""
    x = rng.standard_normal(n).astype(np.float32) * np.float32(10.0) ** rng.integers(-40, 38, n).astype(np.float32)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-40, 3.3895314e38, 1.0 + 2**-8,
                         1.0 + 3 * 2**-8, 1.0 + 2**-8 + 2**-20], dtype=np.float32)
    x[: len(specials)] = specials
    return x


@pytest.mark.parametrize("route", ["device", "upload", "download"])
def test_copy_converts_float32_to_bfloat16_and_back_exactly(device, route):
    rng = np.random.default_rng(0)
    x = special_values(rng, 1001).reshape(7, 143)
    bits = _core.kernels.copy(x, "bfloat16", device, route)
    np.testing.assert_array_equal(bits, to_bf16_bits(x))
    back = _core.kernels.copy(bits, "float32", device, route)
    np.testing.assert_array_equal(back.view(np.uint32), from_bf16_bits(bits).view(np.uint32))
    same = _core.kernels.copy(x, "float32", device, route)
    np.testing.assert_array_equal(same.view(np.uint32), x.view(np.uint32))


@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.uint16])
def test_fill_zero(device, dtype):
    x = np.arange(1, 1 + 3 * 37, dtype=dtype).reshape(3, 37)
    out = _core.kernels.fill_zero(x, device)
    assert out.dtype == dtype and out.shape == x.shape and not out.any()


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_matmul_matches_float64(device, m, k, n, ta, tb, precision):
    rng = np.random.default_rng(m * 10007 + k * 101 + n)
    a = rng.standard_normal((k, m) if ta else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if tb else (k, n)).astype(np.float32)
    c0 = rng.standard_normal((m, n)).astype(np.float32)
    alpha, beta = (1.0, 0.0) if precision == "fp32" else (1.5, 0.5)
    if precision == "bf16":
        a_in, b_in = to_bf16_bits(a), to_bf16_bits(b)
        a, b = from_bf16_bits(a_in), from_bf16_bits(b_in)  # the values the kernel sees
    else:
        a_in, b_in = a, b
    c, guards = _core.kernels.matmul(a_in, ta, b_in, tb, c0.copy(), alpha, beta, device, GUARD)
    assert np.isnan(guards).all(), "matmul wrote outside C"
    A = a.astype(np.float64).T if ta else a.astype(np.float64)
    B = b.astype(np.float64).T if tb else b.astype(np.float64)
    want = alpha * A @ B + beta * c0.astype(np.float64)
    scale = np.abs(alpha) * np.abs(A) @ np.abs(B) + np.abs(beta * c0.astype(np.float64))
    assert np.all(np.abs(c - want) <= 1e-5 * scale + 1e-30), np.max(np.abs(c - want) / (scale + 1e-30))


def test_matmul_on_a_misaligned_output(device):
    """C starting one float into its buffer (a view at an odd offset): the GEMM must cope."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((9, 33)).astype(np.float32)
    b = rng.standard_normal((33, 11)).astype(np.float32)
    c, guards = _core.kernels.matmul(a, False, b, False, np.zeros((9, 11), np.float32), 1.0, 0.0, device, 1)
    assert np.isnan(guards).all()
    np.testing.assert_allclose(c, a.astype(np.float64) @ b, rtol=1e-5, atol=1e-5)


def test_matmul_rejects_mixed_dtypes(device):
    a = np.ones((2, 3), np.float32)
    b = to_bf16_bits(np.ones((3, 4), np.float32))
    with pytest.raises(ValueError, match="must both be float32 or both bfloat16"):
        _core.kernels.matmul(a, False, b, False, np.zeros((2, 4), np.float32), 1.0, 0.0, device)
