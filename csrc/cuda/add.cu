// add_to on a CUDA device; math in palmcore/op_signatures.inc:
//   x += y   (element by element, same shape: one rounding each, the CPU's bits)
#include <algorithm>

#include "cuda/context.h"

namespace palmcore::cuda {
namespace {

// One thread per element (grid-stride).
__global__ void add_to_kernel(float* x, const float* y, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) x[i] += y[i];
}

}  // namespace

void add_to(Tensor& x, const Tensor& y) {
  const int64_t n = x.numel();
  if (n == 0) return;
  constexpr int kThreads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 4096));
  add_to_kernel<<<blocks, kThreads, 0, context().stream()>>>(x.data<float>(), y.data<float>(), n);
  check_cuda(cudaGetLastError(), "add_to");
}

}  // namespace palmcore::cuda
