// SiLU and the SwiGLU gate per element, shared by both backends (PALMCORE_HD):
//   σ(g) = 1 / (1 + e^-g)   silu(g) = g·σ(g)   silu'(g) = σ(g)(1 + g(1 - σ(g)))
//   swiglu:  out = silu(g)·u;  dgate = dout·u·σ(g)(1 + g(1 - σ(g))),  dup = dout·g·σ(g)
//
// Rounding, the same bits on a CPU and a GPU: the one multiply-add, 1 + g(1 - σ), is NOT fused:
// g++ (-march=native, -ffp-contract=fast) left it a rounded product and a rounded sum in the
// CPU kernel, so that is the form kept; on the device it is __fmul_rn/__fadd_rn, which nvcc
// never contracts. (On the host, plain a*b + c relies on g++ keeping that choice in the
// kernel's loop; the SwiGLU tests and the model's bits check it.) The rest is products, one
// subtraction and a correctly rounded division; products are formed left to right as
// written, the kernels' order (dout·g·σ, not dout·silu(g)).
#pragma once

#include "palmcore/math/exp.h"
#include "palmcore/math/host_device.h"

namespace palmcore {

// x·y + z with the product rounded first: never one FMA.
PALMCORE_HD float mul_add_rn(float x, float y, float z) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(__fmul_rn(x, y), z);
#else
  return x * y + z;
#endif
}

// σ(x) = 1 / (1 + e^-x), with exp_approx.
PALMCORE_HD float sigmoid_approx(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

// silu(x) = x·σ(x)
PALMCORE_HD float silu(float x) { return x * sigmoid_approx(x); }

// silu'(x) = σ(x)(1 + x(1 - σ(x)))
PALMCORE_HD float silu_grad(float x) {
  const float s = sigmoid_approx(x);
  return s * mul_add_rn(x, 1.0f - s, 1.0f);
}

// out = silu(g)·u
PALMCORE_HD float swiglu(float g, float u) { return silu(g) * u; }

// dgate = dout·u·σ(g)·(1 + g(1 - σ(g))) and dup = dout·g·σ(g), multiplied left to right.
PALMCORE_HD void swiglu_backward(float g, float u, float dout, float& dgate, float& dup) {
  const float s = sigmoid_approx(g);
  dgate = dout * u * s * mul_add_rn(g, 1.0f - s, 1.0f);
  dup = dout * g * s;
}

}  // namespace palmcore
