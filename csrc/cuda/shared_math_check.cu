// Test only: shared_math_row (cuda/shared_math_check.h) on the device, one thread per element.
#include "cuda/context.h"
#include "cuda/shared_math_check.h"

namespace palmcore::cuda {
namespace {

__global__ void shared_math_kernel(const float* x, const float* y, float* out, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) shared_math_row(x[i], y[i], out + i * kSharedMathColumns);
}

}  // namespace

std::vector<float> shared_math_rows(const std::vector<float>& x, const std::vector<float>& y) {
  const int64_t n = static_cast<int64_t>(x.size());
  std::vector<float> rows(n * kSharedMathColumns);
  if (n == 0) return rows;
  Tensor dx = Tensor::zeros({n}, DType::F32, Device::CUDA), dy = Tensor::zeros({n}, DType::F32, Device::CUDA);
  Tensor drows = Tensor::zeros({n * kSharedMathColumns}, DType::F32, Device::CUDA);
  cuda::copy(Tensor::borrow(const_cast<float*>(x.data()), {n}, DType::F32), dx);
  cuda::copy(Tensor::borrow(const_cast<float*>(y.data()), {n}, DType::F32), dy);
  constexpr int kThreads = 256;
  shared_math_kernel<<<static_cast<int>((n + kThreads - 1) / kThreads), kThreads, 0, context().stream()>>>(
      dx.data<float>(), dy.data<float>(), drows.data<float>(), n);
  check_cuda(cudaGetLastError(), "shared_math_rows");
  Tensor back = Tensor::borrow(rows.data(), {n * kSharedMathColumns}, DType::F32);
  cuda::copy(drows, back);  // waits for the kernel
  return rows;
}

}  // namespace palmcore::cuda
