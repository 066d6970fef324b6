"""The ops' one validation layer (csrc/ops.cpp): tensors that do not fit an op are refused
with a ValueError naming the op, the tensor and the shapes, before any backend reads them
(before it, these calls read or wrote outside their arrays)."""

from __future__ import annotations

import numpy as np
import pytest

from palmcore import _core

K = _core.kernels
rng = np.random.default_rng(0)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


CASES = [
    (lambda: K.swiglu_forward(f32(3, 5), f32(3, 4)), r"swiglu_forward: up has shape \[3, 4\], expected \[3, 5\]"),
    (lambda: K.layernorm_forward(f32(4, 6), f32(5), 1e-5), r"layernorm_forward: scale has shape \[5\], expected \[6\]"),
    (lambda: K.attention_forward(f32(8, 12), f32(8, 4), f32(7, 4), 2, 3, 1),
     r"attention_forward: v has shape \[7, 4\], expected \[8, 4\]"),
    (lambda: K.attention_forward(f32(8, 12), f32(8, 6), f32(8, 6), 2, 3, 1),
     r"attention_forward: k has shape \[8, 6\], expected \[8, 4\]"),
    (lambda: K.cross_entropy_stats(f32(4, 9), np.zeros(3, np.int32), 0),
     r"cross_entropy_stats: targets has shape \[3\], expected \[4\]"),
    (lambda: K.rope_apply(f32(4, 10), np.zeros(4, np.int32), 2, 1e4, False),
     r"rope_apply: x's width 10 is not 2 heads of an even width"),
    (lambda: K.matmul(f32(3, 4), False, f32(5, 6), False, np.zeros((3, 6), np.float32), 1.0, 0.0),
     r"matmul: shapes \[3, 4\] x \[5, 6\] -> \[3, 6\] do not agree"),
]


@pytest.mark.parametrize("call,match", CASES, ids=[c[1].split(":")[0] + str(i) for i, c in enumerate(CASES)])
def test_misfit_tensors_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_fitting_tensors_still_pass():
    out = K.swiglu_forward(f32(3, 5), f32(3, 5))
    assert out.shape == (3, 5) and np.isfinite(out).all()
