// The sparse MLP's routing, dispatch and combine on a CUDA device; math in
// palmcore/op_signatures.inc and, per row, palmcore/math/routing.h (PALMCORE_HD: the CPU
// kernel's very functions). Plain kernels, deterministic: a row's values come from one thread,
// the statistics sum rows in order, the dispatch places rows in ascending order. The expert
// GEMMs themselves are cuBLASLt products on the grouped rows (model.cpp).
#include <algorithm>
#include <stdexcept>

#include "cuda/context.h"
#include "palmcore/math/bf16.h"
#include "palmcore/math/routing.h"

namespace palmcore::cuda {
namespace {

constexpr int kThreads = 128;

unsigned blocks_for(int64_t n) { return static_cast<unsigned>(std::max<int64_t>(1, (n + kThreads - 1) / kThreads)); }

// One thread per row.
__global__ void route_kernel(const float* r, int64_t N, int64_t E, int64_t k, float* pr, float* lse, int32_t* experts,
                             float* weights) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < N) route_row(r + i * E, E, k, pr + i * E, lse[i], experts + i * k, weights + i * k);
}

// stats[e] += Σ_i pr[i, e], stats[E + e] += the rows routed to e, stats[2E] += Σ_i lse_i²: one
// thread per value of stats, rows in order.
__global__ void route_stats_kernel(const float* pr, const float* lse, const int32_t* experts, int64_t N, int64_t E,
                                   int64_t k, double* stats) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j > 2 * E) return;
  double sum = 0.0;
  if (j < E) {
    for (int64_t i = 0; i < N; ++i) sum += pr[i * E + j];
  } else if (j < 2 * E) {
    for (int64_t a = 0; a < N * k; ++a) sum += experts[a] == j - E;
  } else {
    for (int64_t i = 0; i < N; ++i) sum += static_cast<double>(lse[i]) * lse[i];
  }
  stats[j] += sum;
}

// One block: thread e counts local expert e's assignments, thread 0 forms the offsets, then
// thread e places its rows in assignment order (rows ascending). Positions of other experts'
// assignments get slot -1 (written by the threads striding over the assignments).
__global__ void dispatch_kernel(const int32_t* experts, int64_t assignments, int64_t k, int64_t first, int64_t count,
                                int32_t* order, int32_t* slot_of, int32_t* offsets) {
  for (int64_t a = threadIdx.x; a < assignments; a += blockDim.x) slot_of[a] = -1;
  for (int64_t e = threadIdx.x; e < count; e += blockDim.x) {
    int32_t n = 0;
    for (int64_t a = 0; a < assignments; ++a) n += experts[a] == first + e;
    offsets[e + 1] = n;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    offsets[0] = 0;
    for (int64_t e = 0; e < count; ++e) offsets[e + 1] += offsets[e];
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < count; e += blockDim.x) {
    int32_t p = offsets[e];
    for (int64_t a = 0; a < assignments; ++a)
      if (experts[a] == first + e) {
        slot_of[a] = p;
        order[p++] = static_cast<int32_t>(a / k);
      }
  }
}

// One thread per (row, column): out[r, d] += Σ_s w · y[slot, d], slots in order.
__global__ void combine_kernel(const float* y, const int32_t* slot_of, const float* weights, float* out, int64_t N,
                               int64_t D, int64_t k) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < N * D; j += stride) {
    const int64_t i = j / D, d = j % D;
    float acc = out[j];
    for (int64_t s = 0; s < k; ++s) {
      const int64_t p = slot_of[i * k + s];
      if (p >= 0) acc += (weights ? weights[i * k + s] : 1.0f) * y[p * D + d];
    }
    out[j] = acc;
  }
}

// dy: one thread per (row, column); dweights: one thread per (row, slot), d in order.
template <class T>
__global__ void combine_dy_kernel(const T* dout, const int32_t* slot_of, const float* weights, T* dy, int64_t N,
                                  int64_t D, int64_t k) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < N * D; j += stride) {
    const int64_t i = j / D, d = j % D;
    for (int64_t s = 0; s < k; ++s) {
      const int64_t p = slot_of[i * k + s];
      if (p >= 0) store_float(dy[p * D + d], weights[i * k + s] * load_float(dout[j]));
    }
  }
}

template <class T>
__global__ void combine_dweights_kernel(const T* dout, const float* y, const int32_t* slot_of, float* dweights,
                                        int64_t N, int64_t D, int64_t k) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // (row, slot)
  if (j >= N * k) return;
  const int64_t i = j / k, p = slot_of[j];
  float dot = 0.0f;
  if (p >= 0)
    for (int64_t d = 0; d < D; ++d) dot += load_float(dout[i * D + d]) * y[p * D + d];
  dweights[j] = dot;
}

__global__ void weights_backward_kernel(const float* pr, const int32_t* experts, const float* weights,
                                        const float* dweights, int64_t N, int64_t E, int64_t k, float* dpr) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < N)
    route_weights_backward_row(pr + i * E, experts + i * k, weights + i * k, dweights + i * k, E, k, dpr + i * E);
}

// share: the block's copy of f_e = stats[E + e] / (Nt·k) in shared memory (E floats); Nt·k is
// the sum of the counts (every thread sums them, in order: the same value everywhere).
__global__ void logits_backward_kernel(const float* pr, const float* lse, const float* dpr, const double* stats,
                                       int64_t N, int64_t E, int64_t k, double balance, double z, float* dr) {
  extern __shared__ float share[];
  double assignments = 0.0;
  for (int64_t e = 0; e < E; ++e) assignments += stats[E + e];
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) share[e] = static_cast<float>(stats[E + e] / assignments);
  __syncthreads();
  const double rows = assignments / k;
  const float balance_n = static_cast<float>(balance * E / rows), z_n = static_cast<float>(z * 2.0 / rows);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < N) route_logits_backward_row(pr + i * E, lse[i], dpr + i * E, share, E, balance_n, z_n, dr + i * E);
}

}  // namespace

void moe_route(const Tensor& logits, int64_t k, Tensor& probs, Tensor& lse, Tensor& experts, Tensor& weights,
               Tensor& stats) {
  const int64_t N = logits.dim(0), E = logits.dim(1);
  const cudaStream_t stream = context().stream();
  if (N > 0) {
    route_kernel<<<blocks_for(N), kThreads, 0, stream>>>(logits.data<float>(), N, E, k, probs.data<float>(),
                                                         lse.data<float>(), experts.data<int32_t>(),
                                                         weights.data<float>());
    check_cuda(cudaGetLastError(), "moe_route");
  }
  route_stats_kernel<<<blocks_for(2 * E + 1), kThreads, 0, stream>>>(
      probs.data<float>(), lse.data<float>(), experts.data<int32_t>(), N, E, k, stats.data<double>());
  check_cuda(cudaGetLastError(), "moe_route (stats)");
}

void moe_dispatch(const Tensor& experts, int64_t first, int64_t count, Tensor& order, Tensor& slot_of,
                  Tensor& offsets) {
  dispatch_kernel<<<1, 256, 0, context().stream()>>>(experts.data<int32_t>(), experts.numel(), experts.dim(1), first,
                                                   count, order.data<int32_t>(), slot_of.data<int32_t>(),
                                                   offsets.data<int32_t>());
  check_cuda(cudaGetLastError(), "moe_dispatch");
}

void moe_combine(const Tensor& y, const Tensor& slot_of, const Tensor* weights, Tensor& out) {
  const int64_t N = out.dim(0), D = out.dim(1);
  if (N * D == 0) return;
  combine_kernel<<<std::min(blocks_for(N * D), 4096u), kThreads, 0, context().stream()>>>(
      y.data<float>(), slot_of.data<int32_t>(), weights ? weights->data<float>() : nullptr, out.data<float>(), N, D,
      slot_of.dim(1));
  check_cuda(cudaGetLastError(), "moe_combine");
}

void moe_combine_backward(const Tensor& dout, const Tensor& y, const Tensor& slot_of, const Tensor& weights,
                          Tensor& dy, Tensor& dweights) {
  const int64_t N = dout.dim(0), D = dout.dim(1), k = slot_of.dim(1);
  if (N == 0) return;
  const cudaStream_t stream = context().stream();
  with_float_storage(dout.dtype(), [&](auto element) {
    using T = decltype(element);
    if (D > 0)
      combine_dy_kernel<<<std::min(blocks_for(N * D), 4096u), kThreads, 0, stream>>>(
          dout.data<T>(), slot_of.data<int32_t>(), weights.data<float>(), dy.data<T>(), N, D, k);
    combine_dweights_kernel<<<blocks_for(N * k), kThreads, 0, stream>>>(dout.data<T>(), y.data<float>(),
                                                                        slot_of.data<int32_t>(),
                                                                        dweights.data<float>(), N, D, k);
  });
  check_cuda(cudaGetLastError(), "moe_combine_backward");
}

void moe_weights_backward(const Tensor& probs, const Tensor& experts, const Tensor& weights, const Tensor& dweights,
                          Tensor& dprobs) {
  const int64_t N = probs.dim(0);
  if (N == 0) return;
  weights_backward_kernel<<<blocks_for(N), kThreads, 0, context().stream()>>>(
      probs.data<float>(), experts.data<int32_t>(), weights.data<float>(), dweights.data<float>(), N, probs.dim(1),
      experts.dim(1), dprobs.data<float>());
  check_cuda(cudaGetLastError(), "moe_weights_backward");
}

void moe_logits_backward(const Tensor& probs, const Tensor& lse, const Tensor& dprobs, const Tensor& stats, int64_t k,
                         double balance, double z, Tensor& dlogits) {
  const int64_t N = probs.dim(0), E = probs.dim(1);
  if (N == 0) return;
  const size_t shared = static_cast<size_t>(E) * sizeof(float);
  if (shared > 48 * 1024) throw std::invalid_argument("moe_logits_backward: too many experts for the CUDA kernel");
  logits_backward_kernel<<<blocks_for(N), kThreads, shared, context().stream()>>>(
      probs.data<float>(), lse.data<float>(), dprobs.data<float>(), stats.data<double>(), N, E, k, balance, z,
      dlogits.data<float>());
  check_cuda(cudaGetLastError(), "moe_logits_backward");
}

}  // namespace palmcore::cuda
