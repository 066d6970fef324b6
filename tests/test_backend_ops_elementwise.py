"""The element-wise and row-wise ops on every available backend (the `device` fixture: cpu,
and cuda where a GPU is): embedding forward/backward, add_to, LayerNorm forward/backward, RoPE,
SwiGLU forward/backward, kv_cache_write. Each runs through `_core.kernels.<op>_on(..., device)`,
which puts every tensor on the device as a view at an offset inside a NaN-filled buffer
(outputs that the op overwrites start NaN) and raises if a kernel wrote outside its tensors.

What must agree, and how closely:
- bit for bit with the CPU fp32 kernel, where both compute each element with the same
  operations in the same order: embedding (a gather; the gradient summed per element in token
  order), add_to, kv_cache_write (copies), RoPE and SwiGLU (the shared PALMCORE_HD math of
  palmcore/math/rope.h and activations.h). The exact ones are also checked bit for bit against
  NumPy float32 doing the same steps.
- LayerNorm: the CUDA kernel reduces a row in a fixed tree of 256 partial sums, the CPU
  sequentially: their bits may differ. Both must be within 1e-5 of each other relative to
  max(max|result|, 1), the inputs being O(1) (a float32 sum of D <= 130 terms errs by at most
  about D · 2^-24 ~ 8e-6 of the sum of |terms|, and far less in practice).
- palmcore.reference (float64), where it has the op (LayerNorm, RoPE, SiLU/SwiGLU): within 1e-5
  relative to max(max|reference|, 1) (all inputs are O(1); exp_approx errs by < 3e-7).
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers import scaled_err
from palmcore import _core, reference

K = _core.kernels
ROWS = [1, 7, 33]
WIDTHS = [1, 5, 64, 130]
TOL = 1e-5


def bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def assert_same_bits(got, want):
    np.testing.assert_array_equal(bits(got), bits(want))


def rng_for(*key):
    return np.random.default_rng(list(key))


# --------------------------------------------------------------------------- embedding

@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("first", [0, 3])
def test_embedding_forward(device, rows, width, first):
    rng = rng_for(1, rows, width, first)
    held = 5
    table = rng.standard_normal((held, width)).astype(np.float32)
    # ids below, inside and above the rows [first, first + held) this table holds
    tokens = rng.integers(first - 2, first + held + 2, size=rows).astype(np.int32)
    got = K.embedding_forward_on(table, tokens, first, device)
    inside = (tokens >= first) & (tokens < first + held)
    want = np.where(inside[:, None], table[np.clip(tokens - first, 0, held - 1)], np.float32(0))
    assert_same_bits(got, want)
    assert_same_bits(got, K.embedding_forward(table, tokens, first))  # the CPU kernel


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("first", [0, 3])
def test_embedding_backward_sums_in_token_order(device, rows, width, first):
    rng = rng_for(2, rows, width, first)
    held = 4  # few rows: many tokens repeat
    dout = rng.standard_normal((rows, width)).astype(np.float32)
    tokens = rng.integers(first - 1, first + held + 1, size=rows).astype(np.int32)
    dtable0 = rng.standard_normal((held, width)).astype(np.float32)  # accumulated into
    got = K.embedding_backward_on(dout, tokens, dtable0, first, device)
    # the CPU kernel's order: each element starts from its value, then the token rows in order
    want = dtable0.copy()
    for r, t in enumerate(tokens):
        if first <= t < first + held:
            want[t - first] += dout[r]
    assert_same_bits(got, want)
    assert_same_bits(got, K.embedding_backward_on(dout, tokens, dtable0, first, "cpu"))
    # the existing CPU binding (from zero) agrees with the new one
    zero = np.zeros_like(dtable0)
    assert_same_bits(K.embedding_backward_on(dout, tokens, zero, first, device),
                     K.embedding_backward(dout, tokens, held, first))


# --------------------------------------------------------------------------- add_to

@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", WIDTHS)
def test_add_to(device, rows, width):
    rng = rng_for(3, rows, width)
    x = rng.standard_normal((rows, width)).astype(np.float32)
    y = rng.standard_normal((rows, width)).astype(np.float32)
    assert_same_bits(K.add_to_on(x, y, device), x + y)


# --------------------------------------------------------------------------- layer norm

def layernorm_inputs(rows, width, seed):
    rng = rng_for(4, seed, rows, width)
    x = (rng.standard_normal((rows, width)) + rng.uniform(-2, 2, (rows, 1))).astype(np.float32)
    scale = (1.0 + 0.2 * rng.standard_normal(width)).astype(np.float32)
    return rng, x, scale


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", WIDTHS)
def test_layernorm_forward(device, rows, width):
    _, x, scale = layernorm_inputs(rows, width, 0)
    eps = 1e-6
    out, xhat, rstd = K.layernorm_forward_on(x, scale, eps, device)
    cpu = K.layernorm_forward(x, scale, eps)
    ref_out, (ref_xhat, ref_rstd, _) = reference.layernorm_forward(x.astype(np.float64), scale.astype(np.float64), eps)
    for got, want_cpu, want_ref in zip((out, xhat, rstd), cpu, (ref_out, ref_xhat, ref_rstd[:, 0])):
        assert scaled_err(got, want_cpu, 1.0) < TOL
        assert scaled_err(got, want_ref, 1.0) < TOL
        if device == "cpu":
            assert_same_bits(got, want_cpu)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", WIDTHS)
def test_layernorm_backward(device, rows, width):
    rng, x, scale = layernorm_inputs(rows, width, 1)
    _, xhat, rstd = K.layernorm_forward(x, scale, 1e-6)  # the CPU's, as the backward's input
    dout = rng.standard_normal((rows, width)).astype(np.float32)
    dx0 = rng.standard_normal((rows, width)).astype(np.float32)  # both accumulated into
    dscale0 = rng.standard_normal(width).astype(np.float32)
    dx, dscale = K.layernorm_backward_on(dout, xhat, rstd, scale, dx0, dscale0, device)
    cpu_dx, cpu_dscale = K.layernorm_backward_on(dout, xhat, rstd, scale, dx0, dscale0, "cpu")
    f64 = np.float64
    ref_dx, ref_dg = reference.layernorm_backward(dout.astype(f64), (xhat.astype(f64), rstd.astype(f64)[:, None],
                                                                     scale.astype(f64)))
    # dx is rstd times O(1) terms: its scale is max(rstd) (large for a width of 1, where xhat = 0)
    dx_floor = max(1.0, float(np.abs(rstd).max()))
    assert scaled_err(dx, cpu_dx, dx_floor) < TOL
    assert scaled_err(dx, dx0 + ref_dx, dx_floor) < TOL
    assert scaled_err(dscale, cpu_dscale, 1.0) < TOL
    assert scaled_err(dscale, dscale0 + ref_dg, 1.0) < TOL
    if device == "cpu":
        zero_dx, zero_ds = K.layernorm_backward_on(dout, xhat, rstd, scale, np.zeros_like(dx0),
                                                   np.zeros_like(dscale0), "cpu")
        old_dx, old_ds = K.layernorm_backward(dout, xhat, rstd, scale)  # the existing binding
        assert_same_bits(zero_dx, old_dx)
        assert_same_bits(zero_ds, old_ds)


# --------------------------------------------------------------------------- RoPE

@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("heads,dh", [(1, 2), (1, 6), (2, 64), (1, 130), (5, 26)])
@pytest.mark.parametrize("inverse", [False, True])
def test_rope_apply(device, rows, heads, dh, inverse):
    rng = rng_for(5, rows, heads, dh, inverse)
    base = 10000.0
    x = rng.standard_normal((rows, heads * dh)).astype(np.float32)
    positions = rng.integers(0, 50, size=rows).astype(np.int32)
    got = K.rope_apply_on(x, positions, heads, base, inverse, device)
    assert_same_bits(got, K.rope_apply(x.copy(), positions, heads, base, inverse))  # the CPU kernel
    theta = positions[:, None].astype(np.float64) * base ** (-2.0 * np.arange(dh // 2) / dh)  # [rows, dh/2]
    x4 = x.astype(np.float64).reshape(1, rows, heads, dh)
    want = (reference.rope_backward if inverse else reference.rope_forward)(x4, theta).reshape(rows, heads * dh)
    assert scaled_err(got, want, 1.0) < TOL


# --------------------------------------------------------------------------- SwiGLU

def swiglu_inputs(rows, width):
    rng = rng_for(6, rows, width)
    gate = rng.standard_normal((rows, width)).astype(np.float32) * 3
    specials = np.array([0.0, -0.0, 1e-3, -1e-3, 20.0, -20.0, 87.5, -87.5, 100.0, -100.0], dtype=np.float32)
    flat = gate.reshape(-1)
    flat[: min(flat.size, specials.size)] = specials[: flat.size]
    up = rng.standard_normal((rows, width)).astype(np.float32)
    dout = rng.standard_normal((rows, width)).astype(np.float32)
    return gate, up, dout


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", WIDTHS)
def test_swiglu_forward(device, rows, width):
    gate, up, _ = swiglu_inputs(rows, width)
    got = K.swiglu_forward_on(gate, up, device)
    assert_same_bits(got, K.swiglu_forward(gate, up))  # the CPU kernel
    want = reference.silu(gate.astype(np.float64)) * up
    # scale: the terms' size, |gate|·|up| (silu(g) ≈ g for large g)
    assert scaled_err(got, want, max(1.0, float(np.abs(gate * up).max()))) < TOL


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", WIDTHS)
def test_swiglu_backward(device, rows, width):
    gate, up, dout = swiglu_inputs(rows, width)
    dgate, dup = K.swiglu_backward_on(gate, up, dout, device)
    cpu_dgate, cpu_dup = K.swiglu_backward(gate, up, dout)  # the CPU kernel
    assert_same_bits(dgate, cpu_dgate)
    assert_same_bits(dup, cpu_dup)
    g = gate.astype(np.float64)
    want_dgate = dout * up * reference.silu_grad(g)
    want_dup = dout * reference.silu(g)
    assert scaled_err(dgate, want_dgate, max(1.0, float(np.abs(dout * up).max()))) < TOL
    assert scaled_err(dup, want_dup, max(1.0, float(np.abs(dout * gate).max()))) < TOL


# --------------------------------------------------------------------------- KV cache

@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", WIDTHS)
def test_kv_cache_write(device, rows, width):
    rng = rng_for(7, rows, width)
    slots_n, capacity = 3, 12
    k = rng.standard_normal((rows, width)).astype(np.float32)
    v = rng.standard_normal((rows, width)).astype(np.float32)
    slots = rng.integers(0, slots_n, size=rows).astype(np.int32)
    positions = rng.integers(0, capacity, size=rows).astype(np.int32)
    if rows > 2:  # two rows naming one place: the later one's values stay (the CPU's order)
        slots[-1], positions[-1] = slots[0], positions[0]
    k_cache = rng.standard_normal((slots_n * capacity, width)).astype(np.float32)
    v_cache = rng.standard_normal((slots_n * capacity, width)).astype(np.float32)
    got_k, got_v = K.kv_cache_write_on(k, v, slots, positions, k_cache, v_cache, capacity, device)
    want_k, want_v = k_cache.copy(), v_cache.copy()
    for r in range(rows):
        want_k[slots[r] * capacity + positions[r]] = k[r]
        want_v[slots[r] * capacity + positions[r]] = v[r]
    assert_same_bits(got_k, want_k)
    assert_same_bits(got_v, want_v)
    cpu_k, cpu_v = K.kv_cache_write_on(k, v, slots, positions, k_cache, v_cache, capacity, "cpu")
    assert_same_bits(got_k, cpu_k)
    assert_same_bits(got_v, cpu_v)
