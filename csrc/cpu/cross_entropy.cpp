// Cross-entropy with PaLM's z-loss, forward and backward in one pass; math in palmcore/ops.h.
#include <algorithm>
#include <cmath>

#include "cpu/cpu_ops.h"
#include "cpu/vector_math.h"

namespace palmcore::cpu {

// lse = log Σ exp(z), ce = lse - z[y];  z <- grad_scale · (softmax(z)(1 + 2·z_loss·lse) - onehot(y))
void cross_entropy_forward_backward(Tensor& logits, const Tensor& targets, float z_loss,
                                    float grad_scale, Tensor& row_ce, Tensor& row_lse) {
  const int64_t rows = logits.dim(0), vocab = logits.dim(1);
  const int32_t* y = targets.data<int32_t>();
  float* ce = row_ce.data<float>();
  float* lses = row_lse.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    float* z = logits.data<float>() + r * vocab;
    if (y[r] < 0) {
      std::fill(z, z + vocab, 0.0f);
      ce[r] = lses[r] = 0.0f;
      continue;
    }
    const float target_logit = z[y[r]];
    const float max_z = max_lanes(z, vocab);
    for (int64_t c = 0; c < vocab; ++c) z[c] = exp_approx(z[c] - max_z);  // unnormalized probabilities
    const double sum = sum_lanes(z, vocab);
    const float lse = max_z + static_cast<float>(std::log(sum));
    ce[r] = lse - target_logit;
    lses[r] = lse;
    const float coef = static_cast<float>(grad_scale * (1.0 + 2.0 * z_loss * lse) / sum);
    for (int64_t c = 0; c < vocab; ++c) z[c] *= coef;
    z[y[r]] -= grad_scale;
  }
}

}  // namespace palmcore::cpu
