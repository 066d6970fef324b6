// Normal draws on the host (parameter initialization) from the shared Philox draws of
// palmcore/math/philox.h (which also holds uniform01, the sampler's draw).
#pragma once

#include <cmath>
#include <cstdint>
#include <utility>

#include "palmcore/math/philox.h"

namespace palmcore {

// Two independent standard normals by Box-Muller from one Philox block, draw (key, stream, index).
inline std::pair<double, double> standard_normal_pair(uint64_t key, uint64_t stream, uint64_t index) {
  const auto r = philox_draw(key, stream, index);
  const double u1 = unit_interval(r[0], r[1]) + 0x1.0p-53;  // (0, 1]: log stays finite
  const double u2 = unit_interval(r[2], r[3]);
  const double radius = std::sqrt(-2.0 * std::log(u1)), angle = 2.0 * M_PI * u2;
  return {radius * std::cos(angle), radius * std::sin(angle)};
}

inline double standard_normal(uint64_t key, uint64_t stream, uint64_t index) {
  return standard_normal_pair(key, stream, index).first;
}

}  // namespace palmcore
