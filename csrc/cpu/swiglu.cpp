// SwiGLU gate, forward and backward; math in palmcore/ops.h.
#include "cpu/cpu_ops.h"
#include "cpu/vector_math.h"

namespace palmcore::cpu {

// out = silu(gate) · up
void swiglu_forward(const Tensor& gate, const Tensor& up, Tensor& out) {
  const int64_t n = gate.numel();
  const float* g = gate.data<float>();
  const float* u = up.data<float>();
  float* o = out.data<float>();
#pragma omp parallel for schedule(static) if (n >= kParallelMinElements)
  for (int64_t i = 0; i < n; ++i) o[i] = g[i] * sigmoid_approx(g[i]) * u[i];
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
  for (int64_t i = 0; i < n; ++i) {
    const float s = sigmoid_approx(g[i]);
    dg[i] = d[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
    du[i] = d[i] * g[i] * s;
  }
}

}  // namespace palmcore::cpu
