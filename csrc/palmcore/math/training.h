// The per-element math of the loss and of the optimizer updates, shared by both backends
// (PALMCORE_HD): cpu/cross_entropy.cpp, cpu/optimizer.cpp and cuda/{cross_entropy,optimizer}.cu.
// Math in palmcore/op_signatures.inc.
//
// Rounding, the same bits on a CPU and a GPU: every multiply-add is written as the explicit
// fma/fmaf that g++ (-march=native, -ffp-contract=fast) made of the CPU kernels' plain
// expressions (read from their disassembly: the first product of each sum, in source order,
// fused into it), so the CPU bits did not change and nvcc (--fmad=true) cannot choose
// differently. Every other operation is a product, quotient, square root or sum that no
// compiler can fuse with its neighbour (no product feeds a plain addition).
#pragma once

#include <cmath>

#include "palmcore/math/host_device.h"

namespace palmcore {

// Cross-entropy backward, one row's factor on softmax: grad_scale · (1 + 2 · z_loss · lse), in
// double, rounded to float once.
PALMCORE_HD float cross_entropy_coef(float lse, float z_loss, float grad_scale) {
  return static_cast<float>(static_cast<double>(grad_scale) *
                            fma(2.0 * static_cast<double>(z_loss), static_cast<double>(lse), 1.0));
}

// Cross-entropy sums, one counted row's terms in double: ce = lse - picked, and
// ce + z_loss · lse².
struct CrossEntropyTerms {
  double ce, with_z;
};
PALMCORE_HD CrossEntropyTerms cross_entropy_terms(float lse, float picked, double z_loss) {
  const double l = lse, ce = l - static_cast<double>(picked);
  return {ce, fma(z_loss * l, l, ce)};
}

// Adafactor pass 1 on one element: v = β2 v + (1 - β2)(g² + eps) with g = g_raw · gscale;
// returns u = g / sqrt(v) (v updated in place).
PALMCORE_HD float adafactor_second_moment_element(float g_raw, float& v, float beta2, float gscale, float eps) {
  const float g = g_raw * gscale;
  v = fmaf(beta2, v, (1.0f - beta2) * fmaf(g, g, eps));
  return g / sqrtf(v);
}

// Adafactor pass 2 on one element: u = g / sqrt(v) / clip_div;  m = β1 m + (1 - β1) u;
// x = x - step_size · m - decay · x (m and x updated in place).
PALMCORE_HD void adafactor_apply_element(float& x, float g_raw, float& m, float v, float gscale, float clip_div,
                                         float step_size, float decay, float beta1) {
  const float u = g_raw * gscale / sqrtf(v) / clip_div;
  m = fmaf(beta1, m, (1.0f - beta1) * u);
  x = fmaf(-decay, x, fmaf(-step_size, m, x));
}

// AdamW on one element: m = β1 m + (1 - β1) g;  v = β2 v + (1 - β2) g²;
// x = x - rate · (m · m_hat) / (sqrt(v · v_hat) + eps) - decay · x (x, m, v updated in place).
PALMCORE_HD void adamw_element(float& x, float g_raw, float& m, float& v, float b1, float b2, float m_hat,
                               float v_hat, float rate, float decay, float gscale, float eps) {
  const float g = g_raw * gscale;
  m = fmaf(b1, m, (1.0f - b1) * g);
  v = fmaf(b2, v, (1.0f - b2) * g * g);
  x = fmaf(-decay, x, x - rate * (m * m_hat) / (sqrtf(v * v_hat) + eps));
}

}  // namespace palmcore
