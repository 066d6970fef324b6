// RoPE (rotate-half) in place on a CUDA device; math in palmcore/op_signatures.inc, per pair
// in palmcore/math/rope.h (rotate_pair, PALMCORE_HD: the CPU kernel's very function):
//   x [rows, heads · dh], pair i < dh/2 of head h at position p = positions[row]:
//   (x1, x2) -> (x1 cos θ - x2 sin θ, x2 cos θ + x1 sin θ),  inverse: θ -> -θ (the backward pass)
// cos θ and sin θ are read from the host-built tables [max_seq_len, dh/2], already on the
// device: the GPU never evaluates the angle itself, so both backends rotate by the same floats.
#include <algorithm>

#include "cuda/context.h"
#include "palmcore/math/bf16.h"
#include "palmcore/math/rope.h"

namespace palmcore::cuda {
namespace {

// One thread per pair (grid-stride): pair j is (row r, head h, index i). T: float or bf16
// storage (rotated in float32).
template <class T>
__global__ void rope_apply_kernel(T* x, const int32_t* positions, const float* cos_table,
                                  const float* sin_table, int64_t rows, int64_t heads, int64_t half, float sign) {
  const int64_t n = rows * heads * half, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    const int64_t i = j % half, h = (j / half) % heads, r = j / (half * heads);
    const int64_t t = static_cast<int64_t>(positions[r]) * half + i;
    T* x1 = x + (r * heads + h) * 2 * half + i;
    T* x2 = x1 + half;
    float a = load_float(*x1), b = load_float(*x2);
    palmcore::rotate_pair(a, b, cos_table[t], sign * sin_table[t]);  // sign = ±1: exact
    store_float(*x1, a);
    store_float(*x2, b);
  }
}

}  // namespace

void rope_apply(Tensor& x, const Tensor& positions, const Tensor& cos_table, const Tensor& sin_table,
                int64_t heads, bool inverse) {
  const int64_t rows = x.dim(0), half = x.dim(1) / heads / 2;
  const int64_t n = rows * heads * half;
  if (n == 0) return;
  constexpr int kThreads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 4096));
  with_float_storage(x.dtype(), [&](auto element) {
    using T = decltype(element);
    rope_apply_kernel<<<blocks, kThreads, 0, context().stream()>>>(x.data<T>(), positions.data<int32_t>(),
                                                                 cos_table.data<float>(), sin_table.data<float>(),
                                                                 rows, heads, half, inverse ? -1.0f : 1.0f);
  });
  check_cuda(cudaGetLastError(), "rope_apply");
}

}  // namespace palmcore::cuda
