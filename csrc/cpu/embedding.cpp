// Token embedding lookup and its scatter-add gradient.
#include <algorithm>
#include <cstring>

#include "cpu/cpu_ops.h"

namespace palmcore::cpu {

// out[r] = table[tokens[r]]
void embedding_forward(const Tensor& table, const Tensor& tokens, Tensor& out, int64_t first) {
  const int64_t rows = tokens.numel(), width = table.dim(1), held = table.dim(0);
  const int32_t* tok = tokens.data<int32_t>();
  const float* tab = table.data<float>();
  float* o = out.data<float>();
#pragma omp parallel for schedule(static) if (rows * width >= kParallelMinElements)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = tok[r] - first;
    if (row >= 0 && row < held)
      std::memcpy(o + r * width, tab + row * width, width * sizeof(float));
    else
      std::fill(o + r * width, o + (r + 1) * width, 0.0f);
  }
}

// dtable[tokens[r]] += dout[r]. Threads split the columns; each sums its columns over the
// rows in row order, so the result does not depend on the thread count.
void embedding_backward(const Tensor& dout, const Tensor& tokens, Tensor& dtable, int64_t first) {
  const int64_t rows = tokens.numel(), width = dtable.dim(1), held = dtable.dim(0);
  const int32_t* tok = tokens.data<int32_t>();
  const float* d = dout.data<float>();
  float* dt = dtable.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t c0 = 0; c0 < width; c0 += kColumnBlock) {
    const int64_t c1 = std::min(width, c0 + kColumnBlock);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t row = tok[r] - first;
      if (row < 0 || row >= held) continue;
      float* dst = dt + row * width;
      const float* src = d + r * width;
      for (int64_t c = c0; c < c1; ++c) dst[c] += src[c];
    }
  }
}

}  // namespace palmcore::cpu
