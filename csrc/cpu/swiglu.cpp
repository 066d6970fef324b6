// SwiGLU gate, forward and backward; math in palmcore/ops.h, per element in
// palmcore/math/activations.h.
#include "cpu/cpu_ops.h"
#include "palmcore/math/activations.h"

namespace palmcore::cpu {

// out = silu(gate) · up
void swiglu_forward(const Tensor& gate, const Tensor& up, Tensor& out) {
  const int64_t n = gate.numel();
  const float* g = gate.data<float>();
  const float* u = up.data<float>();
  float* o = out.data<float>();
#pragma omp parallel for schedule(static) if (n >= kParallelMinElements)
  for (int64_t i = 0; i < n; ++i) o[i] = swiglu(g[i], u[i]);
}

// dgate = dout · up · σ(g)(1 + g(1 - σ(g))),  dup = dout · silu(g)
void swiglu_backward(const Tensor& gate, const Tensor& up, const Tensor& dout, Tensor& dgate,
                     Tensor& dup) {
  const int64_t n = gate.numel();
  const float* g = gate.data<float>();
  const float* u = up.data<float>();
  const float* d = dout.data<float>();
  float* dg = dgate.data<float>();
  float* du = dup.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) palmcore::swiglu_backward(g[i], u[i], d[i], dg[i], du[i]);
}

}  // namespace palmcore::cpu
