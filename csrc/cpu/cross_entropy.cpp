// Cross-entropy with PaLM's z-loss over a (possibly vocabulary-sharded) row of logits, in two
// passes around the combination of the shards' log-sum-exps; math in palmcore/op_signatures.inc.
#include <algorithm>
#include <cmath>

#include "cpu/cpu_ops.h"
#include "cpu/vector_math.h"
#include "palmcore/math/training.h"

namespace palmcore::cpu {

// lse_shard = log Σ_c exp(z_c) = max + log Σ_c exp(z_c - max);  picked = z[y - first] or 0
void cross_entropy_stats(const Tensor& logits, const Tensor& targets, int64_t first, Tensor& lse,
                         Tensor& picked) {
  const int64_t rows = logits.dim(0), vocab = logits.dim(1);
  const int32_t* y = targets.data<int32_t>();
  float* lses = lse.data<float>();
  float* pick = picked.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* z = logits.data<float>() + r * vocab;
    const float max_z = max_lanes(z, vocab);
    lses[r] = max_z + static_cast<float>(std::log(sum_exp_lanes(z, vocab, max_z)));
    const int64_t column = static_cast<int64_t>(y[r]) - first;
    pick[r] = y[r] >= 0 && column >= 0 && column < vocab ? z[column] : 0.0f;
  }
}

// dz = grad_scale · (exp(z - lse) · (1 + 2 · z_loss · lse) - onehot(y - first))
void cross_entropy_backward(Tensor& logits, const Tensor& targets, int64_t first, const Tensor& lse,
                            float z_loss, float grad_scale) {
  const int64_t rows = logits.dim(0), vocab = logits.dim(1);
  const int32_t* y = targets.data<int32_t>();
  const float* lses = lse.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    float* z = logits.data<float>() + r * vocab;
    if (y[r] < 0) {
      std::fill(z, z + vocab, 0.0f);
      continue;
    }
    const float coef = cross_entropy_coef(lses[r], z_loss, grad_scale);
    for (int64_t c = 0; c < vocab; ++c) z[c] = coef * exp_approx(z[c] - lses[r]);
    const int64_t column = static_cast<int64_t>(y[r]) - first;
    if (column >= 0 && column < vocab) z[column] -= grad_scale;
  }
}

void lse_combine(Tensor& lse, const Tensor& top, bool back) {
  float* l = lse.data<float>();
  const float* t = top.data<float>();
  for (int64_t r = 0; r < lse.numel(); ++r) l[r] = back ? t[r] + std::log(l[r]) : std::exp(l[r] - t[r]);
}

void cross_entropy_sums(const Tensor& lse, const Tensor& picked, const Tensor& targets, double z_loss,
                        Tensor& sums) {
  const float* l = lse.data<float>();
  const float* z_y = picked.data<float>();
  const int32_t* y = targets.data<int32_t>();
  double* out = sums.data<double>();
  for (int64_t r = 0; r < lse.numel(); ++r) {
    if (y[r] < 0) continue;
    const CrossEntropyTerms t = cross_entropy_terms(l[r], z_y[r], z_loss);
    out[0] += t.ce;
    out[1] += t.with_z;
  }
}

}  // namespace palmcore::cpu
