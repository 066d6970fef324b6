// Lane reductions written so the compiler vectorizes them; exp_approx is shared with the CUDA
// backend (palmcore/math/exp.h).
#pragma once

#include <cstdint>

#include "palmcore/math/exp.h"

namespace palmcore::cpu {

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

}  // namespace palmcore::cpu
