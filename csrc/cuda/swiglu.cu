// SwiGLU gate, forward and backward, on a CUDA device; math in palmcore/op_signatures.inc,
// per element in palmcore/math/activations.h (PALMCORE_HD: the very functions the CPU kernels
// call, written so both give the same bits):
//   forward:   out = silu(gate) · up,  silu(g) = g · σ(g)
//   backward:  dgate = dout · up · σ(g) · (1 + g · (1 - σ(g))),  dup = dout · g · σ(g)  (overwritten)
#include <algorithm>

#include "cuda/context.h"
#include "palmcore/math/activations.h"

namespace palmcore::cuda {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 4096)); }

// One thread per element (grid-stride).
__global__ void swiglu_forward_kernel(const float* g, const float* u, float* out, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = palmcore::swiglu(g[i], u[i]);
}

__global__ void swiglu_backward_kernel(const float* g, const float* u, const float* dout, float* dgate, float* dup,
                                       int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    float dg, du;
    palmcore::swiglu_backward(g[i], u[i], dout[i], dg, du);
    dgate[i] = dg;
    dup[i] = du;
  }
}

}  // namespace

void swiglu_forward(const Tensor& gate, const Tensor& up, Tensor& out) {
  const int64_t n = gate.numel();
  if (n == 0) return;
  swiglu_forward_kernel<<<blocks_for(n), kThreads, 0, context().stream>>>(gate.data<float>(), up.data<float>(),
                                                                           out.data<float>(), n);
  check_cuda(cudaGetLastError(), "swiglu_forward");
}

void swiglu_backward(const Tensor& gate, const Tensor& up, const Tensor& dout, Tensor& dgate, Tensor& dup) {
  const int64_t n = gate.numel();
  if (n == 0) return;
  swiglu_backward_kernel<<<blocks_for(n), kThreads, 0, context().stream>>>(
      gate.data<float>(), up.data<float>(), dout.data<float>(), dgate.data<float>(), dup.data<float>(), n);
  check_cuda(cudaGetLastError(), "swiglu_backward");
}

}  // namespace palmcore::cuda
