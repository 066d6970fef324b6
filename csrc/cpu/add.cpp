// x += y; math in palmcore/op_signatures.inc.
#include "cpu/cpu_ops.h"

namespace palmcore::cpu {

void add_to(Tensor& x, const Tensor& y) {
  const int64_t n = x.numel();
  float* xs = x.data<float>();
  const float* ys = y.data<float>();
#pragma omp parallel for schedule(static) if (n >= kParallelMinElements)
  for (int64_t i = 0; i < n; ++i) xs[i] += ys[i];
}

}  // namespace palmcore::cpu
