"""The error measure of the tests, helpers.scaled_err: it accepts rounding noise on a reference
that is exactly zero, and it still flags a real error."""

from __future__ import annotations

import math

import numpy as np
import pytest

from palmcore import _core
from palmcore import reference as ref

from helpers import max_abs, scaled_err


def test_definition():
    # max|a - b| / max(max|b|, floor)
    assert scaled_err(np.array([3.0, 4.0]), np.array([3.0, 0.0]), floor=1.0) == pytest.approx(4 / 3)
    assert scaled_err(np.array([3.0, 4.0]), np.array([3.0, 0.0]), floor=8.0) == pytest.approx(0.5)
    assert scaled_err(np.zeros(3), np.zeros(3), floor=1.0) == 0.0
    assert scaled_err(np.zeros(0), np.zeros(0), floor=1.0) == 0.0
    assert scaled_err(2.0, 1.0, floor=1e-3) == 1.0                      # scalars too
    assert max_abs(np.array([1.0, -5.0]), {"x": np.array([2.0])}, np.zeros(0)) == 5.0


def test_misuse_is_refused():
    for floor in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(AssertionError, match="floor"):
            scaled_err(np.ones(2), np.ones(2), floor=floor)
    with pytest.raises(AssertionError, match="shapes"):
        scaled_err(np.ones(2), np.ones(3), floor=1.0)


def test_nan_and_inf_fail():
    for bad in (math.nan, math.inf, -math.inf):
        err = scaled_err(np.array([1.0, bad]), np.array([1.0, 2.0]), floor=1.0)
        assert not err <= 1e-4


def test_noise_on_a_zero_reference_passes_and_a_real_error_fails():
    """The case of the issue: with T = 1 attention sees one key, so the gradients with respect to
    q and k are exactly 0 in float64; the float32 kernel returns rounding noise. Against the
    floor (the largest of dq, dk, dv) the noise is far below tolerance, and a wrong dq is not."""
    rng = np.random.default_rng(0)
    B, H, dh = 4, 2, 8
    q, k, v, dout = (rng.standard_normal((B, H * dh)).astype(np.float32) for _ in range(4))
    out, lse = _core.kernels.attention_forward(q, k, v, B, H, H)
    dq, dk, dv = _core.kernels.attention_backward(q, k, v, out, lse, dout, B, H, H)
    as4 = lambda a: a.astype(np.float64).reshape(B, 1, H, dh)  # noqa: E731
    _, cache = ref.attention_forward(as4(q), as4(k), as4(v))
    wq, wk, wv = (w.reshape(B, -1) for w in ref.attention_backward(as4(dout), cache))
    assert not wq.any() and not wk.any() and wv.any()
    floor = max_abs(wq, wk, wv)
    for got, want in ((dq, wq), (dk, wk), (dv, wv)):
        assert scaled_err(got, want, floor=floor) <= 1e-4
    # a wrong gradient: dq with one entry off by 1 % of the gradient scale
    wrong = dq.astype(np.float64)
    wrong[1, 3] += 1e-2 * floor
    assert scaled_err(wrong, wq, floor=floor) > 1e-4
    # and a wrong dv: its largest entry off by 1 %
    wrong = dv.astype(np.float64)
    wrong.flat[np.argmax(np.abs(wv))] *= 1.01
    assert scaled_err(wrong, wv, floor=floor) > 1e-4


def test_rounding_noise_passes_and_a_relative_error_fails():
    """float32 rounding of a float64 array passes 1e-6; an error of 1e-3 in one element of the
    largest magnitude fails it."""
    b = np.random.default_rng(1).standard_normal(1000)
    assert scaled_err(b.astype(np.float32), b, floor=1.0) <= 1e-6
    wrong = b.copy()
    i = int(np.argmax(np.abs(b)))
    wrong[i] *= 1 + 1e-3
    assert scaled_err(wrong, b, floor=1.0) > 1e-4
