// Writing keys and values into the key/value cache; math in palmcore/op_signatures.inc.
#include <cstring>

#include "cpu/cpu_ops.h"

namespace palmcore::cpu {

// K[slots[r], positions[r]] = k_r and V[slots[r], positions[r]] = v_r: one row copy each.
void kv_cache_write(const Tensor& k, const Tensor& v, const Tensor& slots, const Tensor& positions,
                    Tensor& k_cache, Tensor& v_cache, int64_t capacity) {
  const int64_t rows = k.dim(0), width = k.dim(1);
  const int32_t* slot = slots.data<int32_t>();
  const int32_t* pos = positions.data<int32_t>();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t at = (static_cast<int64_t>(slot[r]) * capacity + pos[r]) * width;
    std::memcpy(k_cache.data<float>() + at, k.data<float>() + r * width, width * sizeof(float));
    std::memcpy(v_cache.data<float>() + at, v.data<float>() + r * width, width * sizeof(float));
  }
}

}  // namespace palmcore::cpu
