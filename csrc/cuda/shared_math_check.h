// Test only: the shared per-element math (palmcore/math/*.h) on one input pair (x, y), computed
// on the host (bindings/kernels.cpp, kernels.shared_math_rows) and by a CUDA kernel
// (shared_math_check.cu), for tests/test_shared_math.py to compare bit for bit.
// Host-compiled files may include it: it names no CUDA type.
#pragma once

#include <vector>

#include "palmcore/math/activations.h"
#include "palmcore/math/philox.h"
#include "palmcore/math/rope.h"

namespace palmcore {

constexpr int kSharedMathColumns = 9;

// out = exp_approx(x), silu(x), silu_grad(x), swiglu(x, y), swiglu_backward(x, y, dout = 1.5)
// (dgate, dup), rotate_pair(x, y) by cos 0.8, sin 0.6 (x', y'), and word 0 of the Philox draw
// (key = bits of x, stream = bits of y, index 3) as the bits of a float.
PALMCORE_HD void shared_math_row(float x, float y, float* out) {
  out[0] = exp_approx(x);
  out[1] = silu(x);
  out[2] = silu_grad(x);
  out[3] = swiglu(x, y);
  swiglu_backward(x, y, 1.5f, out[4], out[5]);
  out[6] = x;
  out[7] = y;
  rotate_pair(out[6], out[7], 0.8f, 0.6f);
  out[8] = bits_float(philox_draw(float_bits(x), float_bits(y), 3)[0]);
}

namespace cuda {
// shared_math_row for every (x[i], y[i]) on the current CUDA device: rows [n, kSharedMathColumns].
std::vector<float> shared_math_rows(const std::vector<float>& x, const std::vector<float>& y);
}  // namespace cuda

}  // namespace palmcore
