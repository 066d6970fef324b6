// Token embedding lookup and its scatter-add gradient.
#include <algorithm>
#include <cstring>

#include "cpu/cpu_ops.h"

namespace palmcore::cpu {

// out[r] = table[tokens[r]]
void embedding_forward(const Tensor& table, const Tensor& tokens, Tensor& out) {
  const int64_t rows = tokens.numel(), width = table.dim(1);
  const int32_t* tok = tokens.data<int32_t>();
  const float* tab = table.data<float>();
  float* o = out.data<float>();
#pragma omp parallel for schedule(static) if (rows * width >= kParallelMinElements)
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(o + r * width, tab + static_cast<int64_t>(tok[r]) * width, width * sizeof(float));
}

// dtable[tokens[r]] += dout[r]. Threads split the columns; each sums its columns over the
// rows in row order, so the result does not depend on the thread count.
void embedding_backward(const Tensor& dout, const Tensor& tokens, Tensor& dtable) {
  const int64_t rows = tokens.numel(), width = dtable.dim(1);
  const int32_t* tok = tokens.data<int32_t>();
  const float* d = dout.data<float>();
  float* dt = dtable.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t c0 = 0; c0 < width; c0 += kColumnBlock) {
    const int64_t c1 = std::min(width, c0 + kColumnBlock);
    for (int64_t r = 0; r < rows; ++r) {
      float* dst = dt + static_cast<int64_t>(tok[r]) * width;
      const float* src = d + r * width;
      for (int64_t c = c0; c < c1; ++c) dst[c] += src[c];
    }
  }
}

}  // namespace palmcore::cpu
