// Writing keys and values into the key/value cache on a CUDA device; math in
// palmcore/op_signatures.inc:
//   K[slots[r], positions[r]] = k_r,  V[slots[r], positions[r]] = v_r
//   (k_cache, v_cache: [slots · capacity, width], slot b's position j at row b · capacity + j)
// When two rows name the same place, the later row's values stay: the CPU kernel's order.
#include <algorithm>

#include "cuda/context.h"

namespace palmcore::cuda {
namespace {

// One block per input row r, its threads over the columns. A row that a later row overwrites
// (same slot and position) writes nothing, so no two blocks write one place: the result does
// not depend on the blocks' order. A slot or position outside the cache (they live on the
// device, unchecked by ops.cpp) writes nothing: the attention reading it gives a NaN row.
// T: float or bf16 (the cache stores what the model's k and v hold, bit for bit).
template <class T>
__global__ void kv_cache_write_kernel(const T* k, const T* v, const int32_t* slots, const int32_t* positions,
                                      T* k_cache, T* v_cache, int64_t rows, int64_t width, int64_t capacity,
                                      int64_t n_slots) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    int later = 0;
    for (int64_t s = r + 1 + threadIdx.x; s < rows; s += blockDim.x)
      later |= slots[s] == slots[r] && positions[s] == positions[r];
    if (__syncthreads_or(later)) continue;  // uniform across the block
    if (slots[r] < 0 || slots[r] >= n_slots || positions[r] < 0 || positions[r] >= capacity) continue;
    const int64_t at = (static_cast<int64_t>(slots[r]) * capacity + positions[r]) * width;
    for (int64_t c = threadIdx.x; c < width; c += blockDim.x) {
      k_cache[at + c] = k[r * width + c];
      v_cache[at + c] = v[r * width + c];
    }
  }
}

}  // namespace

void kv_cache_write(const Tensor& k, const Tensor& v, const Tensor& slots, const Tensor& positions,
                    Tensor& k_cache, Tensor& v_cache, int64_t capacity) {
  const int64_t rows = k.dim(0), width = k.dim(1);
  if (rows == 0 || width == 0) return;
  constexpr int kThreads = 128;
  const int blocks = static_cast<int>(std::min<int64_t>(rows, 65535));
  with_float_storage(k_cache.dtype(), [&](auto element) {
    using T = decltype(element);
    kv_cache_write_kernel<<<blocks, kThreads, 0, context().stream()>>>(
        k.data<T>(), v.data<T>(), slots.data<int32_t>(), positions.data<int32_t>(), k_cache.data<T>(),
        v_cache.data<T>(), rows, width, capacity, k_cache.dim(0) / capacity);
  });
  check_cuda(cudaGetLastError(), "kv_cache_write");
}

}  // namespace palmcore::cuda
