// copy, fill_zero and round_bf16 on a CUDA device (the shapes and dtypes were checked in ops.cpp). Every
// conversion between float32 and bfloat16 runs on the device, through math/bf16.h: the very
// code the CPU backend runs, so both round alike, bit for bit.
#include "cuda/context.h"

namespace palmcore::cuda {
namespace {

PALMCORE_HD void convert(float x, bf16& out) { out = to_bf16(x); }
PALMCORE_HD void convert(bf16 x, float& out) { out = from_bf16(x); }

// d[i] = convert(s[i]) for i < n: float32 -> bf16 rounds to nearest even, bf16 -> float32 is
// exact. A grid-stride loop, one element per thread per pass.
template <typename S, typename D>
__global__ void convert_kernel(const S* s, D* d, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    convert(s[i], d[i]);
}

template <typename S, typename D>
void launch_convert(const Tensor& src, Tensor& dst, cudaStream_t stream) {
  const int64_t n = src.numel();
  if (n == 0) return;
  constexpr int kThreads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 4096));
  convert_kernel<<<blocks, kThreads, 0, stream>>>(src.data<S>(), dst.data<D>(), n);
  check_cuda(cudaGetLastError(), "copy (float32 <-> bfloat16)");
}

// Both on the device: one conversion kernel.
void convert_on_device(const Tensor& src, Tensor& dst, cudaStream_t stream) {
  if (dst.dtype() == DType::BF16)
    launch_convert<float, bf16>(src, dst, stream);
  else
    launch_convert<bf16, float>(src, dst, stream);
}

// x[i] = round_bf16(x[i]) for i < n, in place (float32 storage, bf16 values).
__global__ void round_bf16_kernel(float* x, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    x[i] = palmcore::round_bf16(x[i]);
}

}  // namespace

void copy(const Tensor& src, Tensor& dst) {
  const Context& ctx = context();
  const bool src_on_device = src.device() == Device::CUDA, dst_on_device = dst.device() == Device::CUDA;
  if (src.dtype() == dst.dtype()) {
    // Bytes as they are; a copy to the host is waited for (the host reads it next), one from
    // pageable host memory has been taken from it when cudaMemcpyAsync returns.
    check_cuda(cudaMemcpyAsync(dst.raw_data(), src.raw_data(), src.nbytes(), cudaMemcpyDefault, ctx.stream()),
               "copy (cudaMemcpyAsync)");
    if (!dst_on_device) check_cuda(cudaStreamSynchronize(ctx.stream()), "copy (cudaStreamSynchronize)");
  } else if (src_on_device && dst_on_device) {
    convert_on_device(src, dst, ctx.stream());
  } else if (dst_on_device) {
    // host -> device with a conversion: upload as it is, convert there
    Tensor staged = Tensor::zeros(src.shape(), src.dtype(), Device::CUDA);
    cuda::copy(src, staged);
    convert_on_device(staged, dst, ctx.stream());
  } else {
    // device -> host with a conversion: convert on the device, then download
    Tensor staged = Tensor::zeros(dst.shape(), dst.dtype(), Device::CUDA);
    convert_on_device(src, staged, ctx.stream());
    cuda::copy(staged, dst);
  }
}

// x = 0, byte for byte (0.0f, bf16 0 and int 0 are all zero bits)
void fill_zero(Tensor& x) {
  check_cuda(cudaMemsetAsync(x.raw_data(), 0, x.nbytes(), context().stream()), "fill_zero (cudaMemsetAsync)");
}

void round_bf16(Tensor& x) {
  const int64_t n = x.numel();
  if (n == 0) return;
  constexpr int kThreads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 4096));
  round_bf16_kernel<<<blocks, kThreads, 0, context().stream()>>>(x.data<float>(), n);
  check_cuda(cudaGetLastError(), "round_bf16");
}

}  // namespace palmcore::cuda
