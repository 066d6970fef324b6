// Rotary position embedding (rotate-half convention), shared by both backends (PALMCORE_HD):
//   θ(p, i) = p · base^(-2i/dh) for the pair (x[i], x[i + dh/2]), i < dh/2
//   (x1, x2) -> (x1 cos θ - x2 sin θ, x2 cos θ + x1 sin θ); the inverse rotates by -θ.
//
// Rounding: rope_angle is double precision and runs where the tables are built, on the host
// (a device's pow may differ from glibc's in the last bit of the double, so the GPU reads the
// host's float tables and never calls it). rotate_pair is the same on both: each output is one
// explicit fmaf around one rounded product, the form g++ chose when this code was CPU-only
// (fused into the first product, the second rounded); a rounded product is __fmul_rn on the
// device so nvcc cannot fuse it as well.
#pragma once

#include <cmath>
#include <cstdint>

#include "palmcore/math/host_device.h"

namespace palmcore {

// θ = p · base^(-2i/dh), in double.
PALMCORE_HD double rope_angle(int64_t pos, int64_t i, int64_t head_dim, double base) {
  return pos * pow(base, -2.0 * i / head_dim);
}

// x·y rounded to float, never fused with a following addition.
PALMCORE_HD float mul_rn(float x, float y) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(x, y);
#else
  return x * y;
#endif
}

// (x1, x2) rotated by the angle whose cosine and sine are c and s:
// x1' = x1·c - x2·s,  x2' = x2·c + x1·s.
PALMCORE_HD void rotate_pair(float& x1, float& x2, float c, float s) {
  const float a = x1, b = x2;
  x1 = fmaf(a, c, -mul_rn(b, s));
  x2 = fmaf(b, c, mul_rn(a, s));
}

}  // namespace palmcore
