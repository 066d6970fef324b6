// Optimizer updates and the deterministic sums of squares on a CUDA device (shapes and dtypes
// checked in ops.cpp); math in palmcore/op_signatures.inc. Plain kernels, written to give the
// CPU's bits: the per-element math of palmcore/math/training.h, the scalars formed on the host
// exactly as cpu/optimizer.cpp forms them, and the sums in cpu/optimizer.cpp's fixed chunks of
// 8192 elements (a chunk summed in order, the chunks added in order). Speed comes later.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cuda/context.h"
#include "palmcore/math/training.h"

namespace palmcore::cuda {
namespace {

// cpu/optimizer.cpp's kChunk: the sums' fixed chunks.
constexpr int64_t kChunk = 8192;
constexpr int kThreads = 256;

int grid_for(int64_t n, int threads) {
  return static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 4096));
}

// partial[c] = Σ_{i in chunk c, in order} x_i² in double (x_i² is exact in double).
// Layout: one thread per chunk, a grid-stride loop over the chunks.
__global__ void sum_squares_chunks_kernel(const float* x, int64_t n, int64_t chunks, double* partial) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < chunks; c += stride) {
    double a = 0.0;
    const int64_t end = min(n, (c + 1) * kChunk);
    for (int64_t i = c * kChunk; i < end; ++i) {
      const double xi = x[i];
      a = __fma_rn(xi, xi, a);
    }
    partial[c] = a;
  }
}

// Pass 1 of Adafactor per element (adafactor_second_moment_element): v updated, u = g / sqrt(v);
// partial[2c] = Σ_{i in chunk c} u_i², partial[2c + 1] = Σ_{i in chunk c} x_i², in order, in
// double. Layout: one thread per chunk, a grid-stride loop over the chunks.
__global__ void adafactor_second_moment_chunks_kernel(const float* x, const float* g, float* v, int64_t n,
                                                      int64_t chunks, float beta2, float gscale, float eps,
                                                      double* partial) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < chunks; c += stride) {
    double a = 0.0, b = 0.0;
    const int64_t end = min(n, (c + 1) * kChunk);
    for (int64_t i = c * kChunk; i < end; ++i) {
      const double u = adafactor_second_moment_element(g[i], v[i], beta2, gscale, eps);
      const double xi = x[i];
      a = __fma_rn(u, u, a);
      b = __fma_rn(xi, xi, b);
    }
    partial[2 * c] = a;
    partial[2 * c + 1] = b;
  }
}

// sums[index + k] = Σ_c partial[width·c + k] for k < width, chunks in order. Layout: one thread.
__global__ void add_chunks_kernel(const double* partial, int64_t chunks, int width, double* sums, int64_t index) {
  for (int k = 0; k < width; ++k) {
    double a = 0.0;
    for (int64_t c = 0; c < chunks; ++c) a = __dadd_rn(a, partial[width * c + k]);
    sums[index + k] = a;
  }
}

// Pass 2 of Adafactor per element (adafactor_apply_element): u = g·gscale / sqrt(v) / clip_div;
// m = β1 m + (1 - β1) u;  x = x - step_size · m - decay · x. Layout: one thread per element,
// grid-stride.
// With `rounded` (not null; R: float or bf16 storage), also rounded = R(x) in the same pass.
template <class R>
__global__ void adafactor_apply_kernel(float* x, const float* g, float* m, const float* v, int64_t n, float gscale,
                                       float clip_div, float step_size, float decay, float beta1, R* rounded) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    adafactor_apply_element(x[i], g[i], m[i], v[i], gscale, clip_div, step_size, decay, beta1);
    if (rounded) store_rounded(rounded[i], x[i]);
  }
}

// AdamW per element (adamw_element): m = β1 m + (1 - β1) g;  v = β2 v + (1 - β2) g²;
// x = x - rate · (m · m_hat) / (sqrt(v · v_hat) + eps) - decay · x. Layout: one thread per
// element, grid-stride.
// With `rounded` (as adafactor_apply_kernel), also rounded = R(x) in the same pass.
template <class R>
__global__ void adamw_kernel(float* x, const float* g, float* m, float* v, int64_t n, float b1, float b2, float m_hat,
                             float v_hat, float rate, float decay, float gscale, float eps, R* rounded) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    adamw_element(x[i], g[i], m[i], v[i], b1, b2, m_hat, v_hat, rate, decay, gscale, eps);
    if (rounded) store_rounded(rounded[i], x[i]);
  }
}

// f(pointer): the rounded copy's elements (float or bf16), or a null float pointer without one.
template <class F>
void with_rounded(Tensor* rounded, F&& f) {
  if (!rounded) return f(static_cast<float*>(nullptr));
  with_float_storage(rounded->dtype(), [&](auto element) { f(rounded->data<decltype(element)>()); });
}

}  // namespace

void sum_squares(const Tensor& x, Tensor& sums, int64_t index) {
  const int64_t n = x.numel(), chunks = (n + kChunk - 1) / kChunk;
  const cudaStream_t stream = context().stream();
  const Scratch partial(std::max<int64_t>(chunks, 1) * sizeof(double));  // the chunks' partial sums
  if (chunks > 0) {
    sum_squares_chunks_kernel<<<grid_for(chunks, kThreads), kThreads, 0, stream>>>(x.data<float>(), n, chunks,
                                                                                  partial.as<double>());
    check_cuda(cudaGetLastError(), "sum_squares");
  }
  add_chunks_kernel<<<1, 1, 0, stream>>>(partial.as<double>(), chunks, 1, sums.data<double>(), index);
  check_cuda(cudaGetLastError(), "sum_squares");
}

void adafactor_second_moment(const Tensor& x, const Tensor& g, Tensor& v, int64_t step, double grad_scale,
                             const AdafactorSettings& s, Tensor& sums, int64_t index) {
  const int64_t n = x.numel(), chunks = (n + kChunk - 1) / kChunk;
  // as cpu/optimizer.cpp
  const float beta2 = static_cast<float>(1.0 - std::pow(static_cast<double>(step), -s.decay));
  const float gscale = static_cast<float>(grad_scale), eps = static_cast<float>(s.eps);
  const cudaStream_t stream = context().stream();
  const Scratch partial(std::max<int64_t>(2 * chunks, 2) * sizeof(double));
  if (chunks > 0) {
    adafactor_second_moment_chunks_kernel<<<grid_for(chunks, kThreads), kThreads, 0, stream>>>(
        x.data<float>(), g.data<float>(), v.data<float>(), n, chunks, beta2, gscale, eps, partial.as<double>());
    check_cuda(cudaGetLastError(), "adafactor_second_moment");
  }
  add_chunks_kernel<<<1, 1, 0, stream>>>(partial.as<double>(), chunks, 2, sums.data<double>(), index);
  check_cuda(cudaGetLastError(), "adafactor_second_moment");
}

void adafactor_apply(Tensor& x, const Tensor& g, Tensor& m, const Tensor& v, double lr, double grad_scale,
                     double rms_u, double rms_x, const AdafactorSettings& s, Tensor* rounded) {
  const int64_t n = x.numel();
  if (n == 0) return;
  // as cpu/optimizer.cpp
  const float gscale = static_cast<float>(grad_scale);
  const float clip_div = static_cast<float>(std::max(1.0, rms_u / s.clip));
  const float step_size = static_cast<float>(lr * std::max(s.min_scale, rms_x));
  const float decay = static_cast<float>(lr * lr), beta1 = static_cast<float>(s.beta1);
  with_rounded(rounded, [&](auto* copy) {
    adafactor_apply_kernel<<<grid_for(n, kThreads), kThreads, 0, context().stream()>>>(
        x.data<float>(), g.data<float>(), m.data<float>(), v.data<float>(), n, gscale, clip_div, step_size, decay,
        beta1, copy);
  });
  check_cuda(cudaGetLastError(), "adafactor_apply");
}

void adamw_update(Tensor& x, const Tensor& g, Tensor& m, Tensor& v, int64_t step, double lr, double grad_scale,
                  const AdamWSettings& s, Tensor* rounded) {
  const int64_t n = x.numel();
  if (n == 0) return;
  // as cpu/optimizer.cpp
  const float b1 = static_cast<float>(s.beta1), b2 = static_cast<float>(s.beta2);
  const float m_hat = static_cast<float>(1.0 / (1.0 - std::pow(s.beta1, double(step))));
  const float v_hat = static_cast<float>(1.0 / (1.0 - std::pow(s.beta2, double(step))));
  const float rate = static_cast<float>(lr), decay = static_cast<float>(lr * s.weight_decay);
  const float gscale = static_cast<float>(grad_scale), eps = static_cast<float>(s.eps);
  with_rounded(rounded, [&](auto* copy) {
    adamw_kernel<<<grid_for(n, kThreads), kThreads, 0, context().stream()>>>(x.data<float>(), g.data<float>(),
                                                                           m.data<float>(), v.data<float>(), n, b1, b2,
                                                                           m_hat, v_hat, rate, decay, gscale, eps,
                                                                           copy);
  });
  check_cuda(cudaGetLastError(), "adamw_update");
}

}  // namespace palmcore::cuda
