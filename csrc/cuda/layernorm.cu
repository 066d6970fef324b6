// Scale-only LayerNorm (no bias), forward and backward, on a CUDA device; math in
// palmcore/op_signatures.inc:
//   forward:   mean = Σ_c x_c / D,  var = Σ_c (x_c - mean)² / D  (biased),  rstd = 1 / sqrt(var + eps)
//              xhat = (x - mean) · rstd,  out = xhat · scale
//   backward:  dxhat = dout · scale
//              dx    += rstd · (dxhat - mean(dxhat) - xhat · mean(dxhat · xhat))   (accumulated)
//              dscale += Σ_rows dout · xhat                                        (accumulated)
//
// Order of the sums, and the CPU's bits. cpu/layernorm.cpp sums each row sequentially, c = 0,
// 1, ..., in one float (g++ keeps it scalar, fusing (x - mean)² into the sum with an FMA).
// Here one block of kThreads threads works a row: thread t sums the columns t, t + kThreads,
// ... in order, then the kThreads partial sums are added pairwise in a fixed tree
// (block_sum). The order is fixed (the same bits on every run, any grid), but it is not the
// CPU's: the row statistics, hence xhat, out, rstd and dx, differ from the CPU in the last
// bits (within 1e-5 relative in fp32, tests/test_backend_ops_elementwise.py).
// dscale: the rows are cut into fixed chunks of kRowsPerChunk; one thread per (chunk, column)
// sums its chunk's rows in order with an FMA into a partial, then one thread per column adds
// the partials in chunk order to dscale. Fixed order (the same bits on every run and GPU), and
// parallel over the rows too (a thread per column alone would leave most of the GPU idle);
// not the CPU's order, so within the same 1e-5 as the row statistics.
#include <algorithm>
#include <stdexcept>

#include "cuda/context.h"
#include "palmcore/math/bf16.h"

namespace palmcore::cuda {
namespace {

constexpr int kThreads = 256;  // a power of two (block_sum)

// The sum of every thread's `v`, the same for all threads of the block: the partial sums are
// added pairwise, halves first (s[t] += s[t + half]), a fixed order. `s` holds kThreads floats.
__device__ float block_sum(float v, float* s) {
  const int t = threadIdx.x;
  s[t] = v;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (t < half) s[t] += s[t + half];
    __syncthreads();
  }
  const float total = s[0];
  __syncthreads();  // s may be reused by the next call
  return total;
}

// One block per row (grid-stride over rows). Out: float or bf16 storage (the bf16 mode's h).
template <class Out>
__global__ void layernorm_forward_kernel(const float* x, const float* scale, float eps, Out* out, float* xhat,
                                         float* rstd, int64_t rows, int64_t width) {
  __shared__ float s[kThreads];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* xr = x + r * width;
    float part = 0.0f;
    for (int64_t c = threadIdx.x; c < width; c += kThreads) part += xr[c];
    const float mean = block_sum(part, s) / width;
    part = 0.0f;
    for (int64_t c = threadIdx.x; c < width; c += kThreads) {
      const float d = xr[c] - mean;
      part = fmaf(d, d, part);
    }
    const float inv = 1.0f / sqrtf(block_sum(part, s) / width + eps);
    if (threadIdx.x == 0) rstd[r] = inv;
    for (int64_t c = threadIdx.x; c < width; c += kThreads) {
      const float h = (xr[c] - mean) * inv;
      xhat[r * width + c] = h;
      store_float(out[r * width + c], h * scale[c]);
    }
  }
}

// dx: one block per row (grid-stride over rows).
__global__ void layernorm_backward_dx_kernel(const float* dout, const float* xhat, const float* rstd,
                                             const float* scale, float* dx, int64_t rows, int64_t width) {
  __shared__ float s[kThreads];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* dyr = dout + r * width;
    const float* xhr = xhat + r * width;
    float part_dxhat = 0.0f, part_dxhat_xhat = 0.0f;
    for (int64_t c = threadIdx.x; c < width; c += kThreads) {
      const float dxhat = dyr[c] * scale[c];
      part_dxhat += dxhat;
      part_dxhat_xhat = fmaf(dxhat, xhr[c], part_dxhat_xhat);
    }
    const float mean_dxhat = block_sum(part_dxhat, s) / width;
    const float mean_dxhat_xhat = block_sum(part_dxhat_xhat, s) / width;
    const float rs = rstd[r];
    for (int64_t c = threadIdx.x; c < width; c += kThreads)
      dx[r * width + c] += rs * (dyr[c] * scale[c] - mean_dxhat - xhr[c] * mean_dxhat_xhat);
  }
}

constexpr int64_t kRowsPerChunk = 256;

// partial[chunk · width + c] = Σ_{rows r of the chunk, in order} dout[r, c] · xhat[r, c]
// (grid: column blocks × chunks).
__global__ void layernorm_dscale_partial_kernel(const float* dout, const float* xhat, float* partial, int64_t rows,
                                                int64_t width) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x, chunk = blockIdx.y;
  if (c >= width) return;
  const int64_t end = min(rows, (chunk + 1) * kRowsPerChunk);
  float acc = 0.0f;
  for (int64_t r = chunk * kRowsPerChunk; r < end; ++r) acc = fmaf(dout[r * width + c], xhat[r * width + c], acc);
  partial[chunk * width + c] = acc;
}

// dscale[c] += Σ_chunks partial[chunk · width + c], chunks in order (one thread per column).
__global__ void layernorm_dscale_add_kernel(const float* partial, float* dscale, int64_t chunks, int64_t width) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= width) return;
  float acc = dscale[c];
  for (int64_t chunk = 0; chunk < chunks; ++chunk) acc += partial[chunk * width + c];
  dscale[c] = acc;
}

}  // namespace

void layernorm_forward(const Tensor& x, const Tensor& scale, float eps, Tensor& out, Tensor& xhat, Tensor& rstd) {
  const int64_t rows = x.dim(0), width = x.dim(1);
  if (rows == 0) return;
  const int blocks = static_cast<int>(std::min<int64_t>(rows, 65535));
  with_float_storage(out.dtype(), [&](auto element) {
    using Out = decltype(element);
    layernorm_forward_kernel<<<blocks, kThreads, 0, context().stream()>>>(
        x.data<float>(), scale.data<float>(), eps, out.data<Out>(), xhat.data<float>(), rstd.data<float>(), rows,
        width);
  });
  check_cuda(cudaGetLastError(), "layernorm_forward");
}

void layernorm_backward(const Tensor& dout, const Tensor& xhat, const Tensor& rstd, const Tensor& scale, Tensor& dx,
                        Tensor& dscale) {
  const int64_t rows = dout.dim(0), width = dout.dim(1);
  if (rows == 0 || width == 0) return;
  const cudaStream_t stream = context().stream();
  const int blocks = static_cast<int>(std::min<int64_t>(rows, 65535));
  layernorm_backward_dx_kernel<<<blocks, kThreads, 0, stream>>>(dout.data<float>(), xhat.data<float>(),
                                                                 rstd.data<float>(), scale.data<float>(),
                                                                 dx.data<float>(), rows, width);
  check_cuda(cudaGetLastError(), "layernorm_backward (dx)");
  const int64_t chunks = (rows + kRowsPerChunk - 1) / kRowsPerChunk;
  const unsigned column_blocks = static_cast<unsigned>((width + kThreads - 1) / kThreads);
  if (chunks > 65535) throw std::invalid_argument("layernorm_backward: more rows than the CUDA kernel's grid takes");
  const Scratch partial(static_cast<size_t>(chunks * width) * sizeof(float));
  layernorm_dscale_partial_kernel<<<dim3(column_blocks, static_cast<unsigned>(chunks)), kThreads, 0, stream>>>(
      dout.data<float>(), xhat.data<float>(), partial.as<float>(), rows, width);
  check_cuda(cudaGetLastError(), "layernorm_backward (dscale partials)");
  layernorm_dscale_add_kernel<<<column_blocks, kThreads, 0, stream>>>(partial.as<float>(), dscale.data<float>(),
                                                                      chunks, width);
  check_cuda(cudaGetLastError(), "layernorm_backward (dscale)");
}

}  // namespace palmcore::cuda
