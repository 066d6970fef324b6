// The router of a sparse MLP, one token row at a time (PALM_SPEC "Sparse activation"), shared
// by both backends (PALMCORE_HD): the CPU tests check the code a GPU runs.
//   forward:   pr = softmax(r),  lse = log Σ_e exp(r_e),  S = the k largest pr (ties: lower id),
//              w_s = pr_{S_s} / Σ_S pr   (experts and weights in rank order: the largest first)
//   backward:  through w (renormalisation included), never through the choice of S:
//              dpr_e = (dw_e - Σ_s dw_s w_s) / Σ_S pr     for e in S, else 0
//              then the auxiliary losses and the softmax:
//              dpr_e += balance · E · f_e / N;   dr = pr (dpr - Σ pr·dpr) + z · 2 lse · pr / N
// Sums run over experts in id order (float, one rounding per term), so a row's values do not
// depend on where it runs.
#pragma once

#include <cmath>
#include <cstdint>

#include "palmcore/math/exp.h"
#include "palmcore/math/host_device.h"

namespace palmcore {

PALMCORE_HD void route_row(const float* r, int64_t E, int64_t k, float* pr, float& lse, int32_t* experts,
                           float* weights) {
  float top = r[0];
  for (int64_t e = 1; e < E; ++e) top = r[e] > top ? r[e] : top;
  float sum = 0.0f;
  for (int64_t e = 0; e < E; ++e) sum += (pr[e] = exp_approx(r[e] - top));
  const float inv = 1.0f / sum;
  for (int64_t e = 0; e < E; ++e) pr[e] *= inv;
  lse = top + logf(sum);
  // the k largest, one at a time: the first (lowest id) of the largest not yet taken
  float picked = 0.0f;
  for (int64_t s = 0; s < k; ++s) {
    int64_t best = -1;
    for (int64_t e = 0; e < E; ++e) {
      bool taken = false;
      for (int64_t t = 0; t < s; ++t) taken |= experts[t] == e;
      if (!taken && (best < 0 || pr[e] > pr[best])) best = e;
    }
    experts[s] = static_cast<int32_t>(best);
    picked += pr[best];
  }
  for (int64_t s = 0; s < k; ++s) weights[s] = pr[experts[s]] / picked;
}

// dpr (E values, overwritten): the part through the weights, from dweights (k values).
PALMCORE_HD void route_weights_backward_row(const float* pr, const int32_t* experts, const float* weights,
                                            const float* dweights, int64_t E, int64_t k, float* dpr) {
  float picked = 0.0f, mixed = 0.0f;
  for (int64_t s = 0; s < k; ++s) {
    picked += pr[experts[s]];
    mixed += dweights[s] * weights[s];
  }
  for (int64_t e = 0; e < E; ++e) dpr[e] = 0.0f;
  for (int64_t s = 0; s < k; ++s) dpr[experts[s]] = (dweights[s] - mixed) / picked;
}

// dr (E values) from dpr (the part through the weights) and the auxiliary losses' weights:
// balance_n = balance · E / N (times f_e, the share of assignments to e), z_n = z · 2 / N.
PALMCORE_HD void route_logits_backward_row(const float* pr, float lse, const float* dpr, const float* share,
                                           int64_t E, float balance_n, float z_n, float* dr) {
  float dot = 0.0f;
  for (int64_t e = 0; e < E; ++e) dot += pr[e] * (dpr[e] + balance_n * share[e]);
  for (int64_t e = 0; e < E; ++e) dr[e] = pr[e] * (dpr[e] + balance_n * share[e] - dot) + z_n * lse * pr[e];
}

}  // namespace palmcore
