// Cross-entropy with PaLM's z-loss on a CUDA device (shapes and dtypes checked in ops.cpp); math
// in palmcore/op_signatures.inc. Plain kernels, written to give the CPU's bits: one block per
// row where a row is reduced, the reductions in the CPU's order (cpu/vector_math.h's 16 lanes,
// rows in order), the per-element math of palmcore/math/{exp,training}.h. Speed comes later.
#include <algorithm>
#include <cstdint>
#include <stdexcept>

#include "cuda/context.h"
#include "palmcore/math/exp.h"
#include "palmcore/math/training.h"

namespace palmcore::cuda {
namespace {

// cpu/vector_math.h's lane count: lane l sums (or maxes) x[i + l] over the full groups of 16,
// the lanes are combined in order 0..15, then the tail x[16·⌊n/16⌋ ..] is added in order.
constexpr int kLanes = 16;

// lse[r] = m + (float) log Σ_c exp_approx(z_c - m), m = max_c z_c (max_lanes, sum_exp_lanes);
// picked[r] = z[y_r - first] if y_r >= 0 and the column is in this shard, else 0.
// Layout: one block of kLanes threads per row; thread l keeps lane l (max in float, exp sum in
// double), thread 0 combines the lanes and the tail in the CPU's order.
__global__ void cross_entropy_stats_kernel(const float* logits, const int32_t* targets, int64_t first,
                                           int64_t vocab, float* lse, float* picked) {
  __shared__ float max_lane[kLanes];
  __shared__ double sum_lane[kLanes];
  __shared__ float row_max;
  const int64_t r = blockIdx.x;
  const int l = threadIdx.x;
  const float* z = logits + r * vocab;
  const int64_t full = vocab / kLanes * kLanes;

  float m = z[0];
  for (int64_t i = 0; i < full; i += kLanes) m = m > z[i + l] ? m : z[i + l];
  max_lane[l] = m;
  __syncthreads();
  if (l == 0) {
    float mm = z[0];
    for (int k = 0; k < kLanes; ++k) mm = mm > max_lane[k] ? mm : max_lane[k];
    for (int64_t i = full; i < vocab; ++i) mm = mm > z[i] ? mm : z[i];
    row_max = mm;
  }
  __syncthreads();
  const float shift = row_max;

  double s = 0.0;
  for (int64_t i = 0; i < full; i += kLanes) s += exp_approx(z[i + l] - shift);
  sum_lane[l] = s;
  __syncthreads();
  if (l == 0) {
    double total = 0.0;
    for (int k = 0; k < kLanes; ++k) total += sum_lane[k];
    for (int64_t i = full; i < vocab; ++i) total += exp_approx(z[i] - shift);
    lse[r] = shift + static_cast<float>(log(total));
    const int32_t y = targets[r];
    const int64_t column = static_cast<int64_t>(y) - first;
    picked[r] = y >= 0 && column >= 0 && column < vocab ? z[column] : 0.0f;
  }
}

// z_c <- coef · exp_approx(z_c - lse_r), coef = grad_scale · (1 + 2 · z_loss · lse_r)
// (cross_entropy_coef), then z[y_r - first] -= grad_scale if that column is in the shard;
// rows with y_r < 0 become 0. Layout: one block per row, threads stride over the columns; the
// target column is corrected after a barrier, by thread 0, from the stored product (as the CPU
// does: the product is rounded before the subtraction, never one FMA).
__global__ void cross_entropy_backward_kernel(float* logits, const int32_t* targets, int64_t first, int64_t vocab,
                                              const float* lse, float z_loss, float grad_scale) {
  const int64_t r = blockIdx.x;
  float* z = logits + r * vocab;
  const int32_t y = targets[r];
  if (y < 0) {
    for (int64_t c = threadIdx.x; c < vocab; c += blockDim.x) z[c] = 0.0f;
    return;
  }
  const float row_lse = lse[r];
  const float coef = cross_entropy_coef(row_lse, z_loss, grad_scale);
  for (int64_t c = threadIdx.x; c < vocab; c += blockDim.x) z[c] = __fmul_rn(coef, exp_approx(z[c] - row_lse));
  __syncthreads();
  const int64_t column = static_cast<int64_t>(y) - first;
  if (threadIdx.x == 0 && column >= 0 && column < vocab) z[column] = __fsub_rn(z[column], grad_scale);
}

// back:      lse_r <- top_r + logf(lse_r)
// to_shares: lse_r <- expf(lse_r - top_r)
// CUDA's expf/logf (no fast math), as the CPU's std::exp/std::log on float: NOT the same
// functions (glibc vs CUDA's libdevice), so the bits may differ by an ulp or two.
// Layout: one thread per element, grid-stride.
__global__ void lse_combine_kernel(float* lse, const float* top, int64_t n, bool back) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    lse[i] = back ? __fadd_rn(top[i], logf(lse[i])) : expf(__fsub_rn(lse[i], top[i]));
}

// sums[0] += Σ_r (lse_r - picked_r),  sums[1] += Σ_r (lse_r - picked_r + z_loss · lse_r²)
// over rows with y_r >= 0, in double, rows in order (cross_entropy_terms). Layout: one thread
// (the row count is the batch's, and the order is the CPU's).
__global__ void cross_entropy_sums_kernel(const float* lse, const float* picked, const int32_t* targets, int64_t rows,
                                          double z_loss, double* sums) {
  double a = sums[0], b = sums[1];
  for (int64_t r = 0; r < rows; ++r) {
    if (targets[r] < 0) continue;
    const CrossEntropyTerms t = cross_entropy_terms(lse[r], picked[r], z_loss);
    a = __dadd_rn(a, t.ce);
    b = __dadd_rn(b, t.with_z);
  }
  sums[0] = a;
  sums[1] = b;
}

int grid_for(int64_t n, int threads) {
  return static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 4096));
}

}  // namespace

void cross_entropy_stats(const Tensor& logits, const Tensor& targets, int64_t first, Tensor& lse, Tensor& picked) {
  const int64_t rows = logits.dim(0), vocab = logits.dim(1);
  if (rows == 0) return;
  if (vocab == 0) throw std::invalid_argument("cross_entropy_stats: the vocabulary is empty");
  cross_entropy_stats_kernel<<<static_cast<unsigned>(rows), kLanes, 0, context().stream()>>>(
      logits.data<float>(), targets.data<int32_t>(), first, vocab, lse.data<float>(), picked.data<float>());
  check_cuda(cudaGetLastError(), "cross_entropy_stats");
}

void cross_entropy_backward(Tensor& logits, const Tensor& targets, int64_t first, const Tensor& lse, float z_loss,
                            float grad_scale) {
  const int64_t rows = logits.dim(0), vocab = logits.dim(1);
  if (rows == 0 || vocab == 0) return;
  cross_entropy_backward_kernel<<<static_cast<unsigned>(rows), 256, 0, context().stream()>>>(
      logits.data<float>(), targets.data<int32_t>(), first, vocab, lse.data<float>(), z_loss, grad_scale);
  check_cuda(cudaGetLastError(), "cross_entropy_backward");
}

void lse_combine(Tensor& lse, const Tensor& top, bool back) {
  const int64_t n = lse.numel();
  if (n == 0) return;
  lse_combine_kernel<<<grid_for(n, 256), 256, 0, context().stream()>>>(lse.data<float>(), top.data<float>(), n, back);
  check_cuda(cudaGetLastError(), "lse_combine");
}

void cross_entropy_sums(const Tensor& lse, const Tensor& picked, const Tensor& targets, double z_loss, Tensor& sums) {
  const int64_t rows = lse.numel();
  if (rows == 0) return;
  cross_entropy_sums_kernel<<<1, 1, 0, context().stream()>>>(lse.data<float>(), picked.data<float>(),
                                                           targets.data<int32_t>(), rows, z_loss, sums.data<double>());
  check_cuda(cudaGetLastError(), "cross_entropy_sums");
}

}  // namespace palmcore::cuda
