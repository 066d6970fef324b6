// Counter-based random numbers: Philox4x32-10 (Salmon et al., "Parallel random numbers: as
// easy as 1, 2, 3", SC 2011). A draw is a pure function of (key, counter), so any element can
// be drawn by any thread in any order and the result never depends on the thread count.
// Shared by both backends (PALMCORE_HD): integer arithmetic and one exact conversion to double,
// so a CPU and a GPU draw the same bits with no rounding choices at all.
#pragma once

#include <cstdint>

#include "palmcore/math/host_device.h"

namespace palmcore {

// Four 32-bit words: a Philox counter or output block.
struct PhiloxBlock {
  uint32_t word[4];
  PALMCORE_HD uint32_t operator[](int i) const { return word[i]; }
};

// Ten rounds of: (c0, c1, c2, c3) -> (hi(M1·c2) ^ c1 ^ k0, lo(M1·c2), hi(M0·c0) ^ c3 ^ k1, lo(M0·c0)),
// then the key (k0, k1) += (W0, W1); the 64-bit key is (k1 << 32) | k0.
PALMCORE_HD PhiloxBlock philox4x32(uint64_t key, PhiloxBlock ctr) {
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t{0xD2511F53u} * ctr[0];
    const uint64_t p1 = uint64_t{0xCD9E8D57u} * ctr[2];
    ctr = {{static_cast<uint32_t>(p1 >> 32) ^ ctr[1] ^ k0, static_cast<uint32_t>(p1),
            static_cast<uint32_t>(p0 >> 32) ^ ctr[3] ^ k1, static_cast<uint32_t>(p0)}};
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return ctr;
}

// The Philox block of draw (key, stream, index): counter (index lo, index hi, stream lo, stream hi).
PALMCORE_HD PhiloxBlock philox_draw(uint64_t key, uint64_t stream, uint64_t index) {
  return philox4x32(key, {{static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32),
                           static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32)}});
}

// A double in [0, 1): ((high << 21) ^ low) mod 2^53, times 2^-53 (both steps exact).
PALMCORE_HD double unit_interval(uint32_t high, uint32_t low) {
  return static_cast<double>(((uint64_t{high} << 21) ^ low) & ((uint64_t{1} << 53) - 1)) * 0x1.0p-53;
}

// Uniform in [0, 1), draw (key, stream, index): the first two words of its block.
PALMCORE_HD double uniform01(uint64_t key, uint64_t stream, uint64_t index) {
  const PhiloxBlock r = philox_draw(key, stream, index);
  return unit_interval(r[0], r[1]);
}

}  // namespace palmcore
