// Rotary position embedding, rotate-half convention; math in palmcore/ops.h, per pair in
// palmcore/math/rope.h.
#include "cpu/cpu_ops.h"
#include "palmcore/math/rope.h"

namespace palmcore::cpu {

// (x1, x2) -> (x1 cos θ - x2 sin θ, x2 cos θ + x1 sin θ); inverse uses -θ (the backward pass).
void rope_apply(Tensor& x, const Tensor& positions, const Tensor& cos_table,
                const Tensor& sin_table, int64_t heads, bool inverse) {
  const int64_t rows = x.dim(0), width = x.dim(1), head_dim = width / heads, half = head_dim / 2;
  const int32_t* pos = positions.data<int32_t>();
  const float sign = inverse ? -1.0f : 1.0f;
  float* xs = x.data<float>();
#pragma omp parallel for schedule(static) if (rows * width >= kParallelMinElements)
  for (int64_t r = 0; r < rows; ++r) {
    const float* cs = cos_table.data<float>() + static_cast<int64_t>(pos[r]) * half;
    const float* sn = sin_table.data<float>() + static_cast<int64_t>(pos[r]) * half;
    for (int64_t h = 0; h < heads; ++h) {
      float* x1 = xs + r * width + h * head_dim;
      float* x2 = x1 + half;
      for (int64_t i = 0; i < half; ++i) rotate_pair(x1[i], x2[i], cs[i], sign * sn[i]);
    }
  }
}

}  // namespace palmcore::cpu
