// Counter-based random numbers: Philox4x32-10 (Salmon et al., "Parallel random numbers: as
// easy as 1, 2, 3", SC 2011). A draw is a pure function of (key, counter), so any element can
// be drawn by any thread in any order and the result never depends on the thread count.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <utility>

namespace palmcore {

inline std::array<uint32_t, 4> philox4x32(uint64_t key, std::array<uint32_t, 4> ctr) {
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t{0xD2511F53u} * ctr[0];
    const uint64_t p1 = uint64_t{0xCD9E8D57u} * ctr[2];
    ctr = {static_cast<uint32_t>(p1 >> 32) ^ ctr[1] ^ k0, static_cast<uint32_t>(p1),
           static_cast<uint32_t>(p0 >> 32) ^ ctr[3] ^ k1, static_cast<uint32_t>(p0)};
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return ctr;
}

// The Philox block of draw (key, stream, index).
inline std::array<uint32_t, 4> philox_draw(uint64_t key, uint64_t stream, uint64_t index) {
  return philox4x32(key, {static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32),
                          static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32)});
}

// A double in [0, 1) from 53 of the bits of two 32-bit words.
inline double unit_interval(uint32_t high, uint32_t low) {
  return static_cast<double>(((uint64_t{high} << 21) ^ low) & ((uint64_t{1} << 53) - 1)) * 0x1.0p-53;
}

// Uniform in [0, 1), draw (key, stream, index).
inline double uniform01(uint64_t key, uint64_t stream, uint64_t index) {
  const auto r = philox_draw(key, stream, index);
  return unit_interval(r[0], r[1]);
}

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
