// bfloat16: the upper 16 bits of a float32 (8 exponent bits, 7 mantissa bits).
//   to_bf16(x)   rounds to the nearest bf16, ties to even; NaN stays a (quiet) NaN
//   from_bf16(b) is exact
// Shared by both backends (PALMCORE_HD), so the CPU's bf16 mode rounds exactly as a GPU does.
#pragma once

#include <cstdint>
#include <cstring>

#include "palmcore/math/host_device.h"

namespace palmcore {

struct bf16 {
  uint16_t bits;
};

PALMCORE_HD uint32_t float_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

PALMCORE_HD float bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

PALMCORE_HD bf16 to_bf16(float x) {
  const uint32_t u = float_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40u)};  // NaN
  const uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);  // half an ulp, ties to the even neighbour
  return bf16{static_cast<uint16_t>((u + rounding) >> 16)};
}

PALMCORE_HD float from_bf16(bf16 b) { return bits_float(static_cast<uint32_t>(b.bits) << 16); }

// x rounded to the nearest bf16 value, kept as a float32.
PALMCORE_HD float round_bf16(float x) { return from_bf16(to_bf16(x)); }

// Kernels written once for float32 and bf16 storage: a load widens (exact), a store rounds to
// the nearest bf16 (ties to even), so a bf16 tensor holds what the CPU's bf16 mode rounds.
PALMCORE_HD float load_float(float x) { return x; }
PALMCORE_HD float load_float(bf16 x) { return from_bf16(x); }
PALMCORE_HD void store_float(float& dst, float value) { dst = value; }
PALMCORE_HD void store_float(bf16& dst, float value) { dst = to_bf16(value); }
// dst = R(value) in either storage (float32 holding the bf16 value, or bf16 itself).
PALMCORE_HD void store_rounded(float& dst, float value) { dst = round_bf16(value); }
PALMCORE_HD void store_rounded(bf16& dst, float value) { dst = to_bf16(value); }

}  // namespace palmcore
