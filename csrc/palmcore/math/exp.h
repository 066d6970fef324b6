// e^x for float, relative error below 3e-7, written so a compiler vectorizes it (no branches,
// no libm calls). Shared by both backends (PALMCORE_HD): softmax, cross-entropy and SiLU.
//
// Rounding, the same bits on a CPU and a GPU: every multiply-add is an explicit fmaf (one
// rounding), so neither g++'s contraction (-std=gnu++17 means -ffp-contract=fast, and
// -march=native brings FMA) nor nvcc's (--fmad=true by default) can choose differently. These
// are exactly the fusions g++ made when this code was CPU-only, so the CPU bits did not change.
// The last product p · 2^n is exact (a normal float for every x in [-87, 88]), so fusing it
// with a caller's addition (1 + e^-x in the sigmoid) cannot change a bit either.
#pragma once

#include <cmath>
#include <cstdint>

#include "palmcore/math/bf16.h"  // bits_float
#include "palmcore/math/host_device.h"

namespace palmcore {

// e^x = 2^n · e^r with n = round(x / ln 2), r = x - n·ln 2 in [-ln2/2, ln2/2] (ln 2 split in two
// for accuracy), e^r by its degree-6 Taylor polynomial (Horner), 2^n built in the exponent bits.
// Below -87 it returns 0 (so e^-inf = 0), above 88 +inf; NaN stays NaN.
PALMCORE_HD float exp_approx(float x) {
  const float c = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : (x == x ? x : 0.0f));  // clamped, NaN -> 0
  // round to nearest by adding and removing 1.5 · 2^23 (vectorizes, unlike roundf)
  const float n = fmaf(c, 1.44269504088896341f, 12582912.0f) - 12582912.0f;
  const float r = fmaf(n, 2.12194440e-4f, fmaf(-n, 0.693359375f, c));
  float p = 1.0f / 720.0f;
  p = fmaf(p, r, 1.0f / 120.0f);
  p = fmaf(p, r, 1.0f / 24.0f);
  p = fmaf(p, r, 1.0f / 6.0f);
  p = fmaf(p, r, 0.5f);
  p = fmaf(p, r, 1.0f);
  p = fmaf(p, r, 1.0f);
  const float e = p * bits_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  return x < -87.0f ? 0.0f : (x > 88.0f ? INFINITY : (x == x ? e : x));
}

}  // namespace palmcore
