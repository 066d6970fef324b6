// Element-wise math written so the compiler vectorizes it (no branches, no libm calls).
#pragma once

#include <cstdint>
#include <cstring>

namespace palmcore::cpu {

// e^x for float, relative error below 3e-7: e^x = 2^n · e^r with n = round(x / ln 2),
// r = x - n·ln 2 in [-ln2/2, ln2/2], e^r by a degree-6 Taylor polynomial, 2^n built in the
// exponent bits. Below -87 it returns 0 (so exp(-inf) = 0), above 88 +inf, NaN stays NaN.
inline float exp_approx(float x) {
  const float c = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : (x == x ? x : 0.0f));  // clamped, NaN -> 0
  // round to nearest by adding and removing 1.5 · 2^23 (vectorizes, unlike roundf)
  const float n = (c * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (c - n * 0.693359375f) + n * 2.12194440e-4f;  // ln 2 split in two for accuracy
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float e = p * scale;
  return x < -87.0f ? 0.0f : (x > 88.0f ? __builtin_inff() : (x == x ? e : x));
}

// Reductions in kLanes independent lanes, combined in a fixed order: the compiler vectorizes
// them (no reassociation needed) and the result does not depend on threads.
constexpr int64_t kLanes = 16;

inline float max_lanes(const float* x, int64_t n) {
  float lane[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lane[l] = x[0];
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lane[l] = lane[l] > x[i + l] ? lane[l] : x[i + l];
  float m = x[0];
  for (int64_t l = 0; l < kLanes; ++l) m = m > lane[l] ? m : lane[l];
  for (; i < n; ++i) m = m > x[i] ? m : x[i];
  return m;
}

inline double sum_lanes(const float* x, int64_t n) {
  double lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lane[l] += x[i + l];
  double s = 0.0;
  for (int64_t l = 0; l < kLanes; ++l) s += lane[l];
  for (; i < n; ++i) s += x[i];
  return s;
}

// Σ exp(x_i - shift), in the same lanes and order as sum_lanes.
inline double sum_exp_lanes(const float* x, int64_t n, float shift) {
  double lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lane[l] += exp_approx(x[i + l] - shift);
  double s = 0.0;
  for (int64_t l = 0; l < kLanes; ++l) s += lane[l];
  for (; i < n; ++i) s += exp_approx(x[i] - shift);
  return s;
}

inline float sigmoid_approx(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

}  // namespace palmcore::cpu
