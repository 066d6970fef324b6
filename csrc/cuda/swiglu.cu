// SwiGLU gate, forward and backward, on a CUDA device; math in palmcore/op_signatures.inc,
// per element in palmcore/math/activations.h (PALMCORE_HD: the very functions the CPU kernels
// call, written so both give the same bits):
//   forward:   out = silu(gate) · up,  silu(g) = g · σ(g)
//   backward:  dgate = dout · up · σ(g) · (1 + g · (1 - σ(g))),  dup = dout · g · σ(g)  (overwritten)
#include <algorithm>

#include "cuda/context.h"
#include "palmcore/math/activations.h"
#include "palmcore/math/bf16.h"

namespace palmcore::cuda {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 4096)); }

// One thread per element (grid-stride); T: float or bf16 storage (computed in float32).
template <class T>
__global__ void swiglu_forward_kernel(const T* g, const T* u, T* out, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    store_float(out[i], palmcore::swiglu(load_float(g[i]), load_float(u[i])));
}

template <class T>
__global__ void swiglu_backward_kernel(const T* g, const T* u, const T* dout, T* dgate, T* dup, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    float dg, du;
    palmcore::swiglu_backward(load_float(g[i]), load_float(u[i]), load_float(dout[i]), dg, du);
    store_float(dgate[i], dg);
    store_float(dup[i], du);
  }
}

}  // namespace

void swiglu_forward(const Tensor& gate, const Tensor& up, Tensor& out) {
  const int64_t n = gate.numel();
  if (n == 0) return;
  with_float_storage(out.dtype(), [&](auto element) {
    using T = decltype(element);
    swiglu_forward_kernel<<<blocks_for(n), kThreads, 0, context().stream()>>>(gate.data<T>(), up.data<T>(),
                                                                             out.data<T>(), n);
  });
  check_cuda(cudaGetLastError(), "swiglu_forward");
}

void swiglu_backward(const Tensor& gate, const Tensor& up, const Tensor& dout, Tensor& dgate, Tensor& dup) {
  const int64_t n = gate.numel();
  if (n == 0) return;
  with_float_storage(dgate.dtype(), [&](auto element) {
    using T = decltype(element);
    swiglu_backward_kernel<<<blocks_for(n), kThreads, 0, context().stream()>>>(
        gate.data<T>(), up.data<T>(), dout.data<T>(), dgate.data<T>(), dup.data<T>(), n);
  });
  check_cuda(cudaGetLastError(), "swiglu_backward");
}

}  // namespace palmcore::cuda
