// copy, fill_zero and round_bf16 on the host (the shapes and dtypes were checked in ops.cpp).
#include <cstring>

#include "cpu/cpu_ops.h"

namespace palmcore::cpu {

// dst = src; float32 -> bfloat16 rounds to nearest even (to_bf16), bfloat16 -> float32 is exact.
void copy(const Tensor& src, Tensor& dst) {
  const int64_t n = src.numel();
  if (src.dtype() == dst.dtype()) {
    std::memcpy(dst.raw_data(), src.raw_data(), src.nbytes());
  } else if (dst.dtype() == DType::BF16) {
    const float* s = src.data<float>();
    bf16* d = dst.data<bf16>();
#pragma omp parallel for schedule(static) if (n >= kParallelMinElements)
    for (int64_t i = 0; i < n; ++i) d[i] = to_bf16(s[i]);
  } else {
    const bf16* s = src.data<bf16>();
    float* d = dst.data<float>();
#pragma omp parallel for schedule(static) if (n >= kParallelMinElements)
    for (int64_t i = 0; i < n; ++i) d[i] = from_bf16(s[i]);
  }
}

void fill_zero(Tensor& x) { std::memset(x.raw_data(), 0, x.nbytes()); }

void round_bf16(Tensor& x) {
  float* v = x.data<float>();
  const int64_t n = x.numel();
#pragma omp parallel for schedule(static) if (n >= kParallelMinElements)
  for (int64_t i = 0; i < n; ++i) v[i] = palmcore::round_bf16(v[i]);
}

}  // namespace palmcore::cpu
