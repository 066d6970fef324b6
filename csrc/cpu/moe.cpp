// The sparse MLP's routing, dispatch and combine on the CPU; math in palmcore/op_signatures.inc
// and, per row, palmcore/math/routing.h. Rows run in parallel; every sum over rows (the
// statistics) and over a row's slots runs in order, so results do not depend on the threads.
#include <algorithm>
#include <vector>

#include "cpu/cpu_ops.h"
#include "palmcore/math/routing.h"

namespace palmcore::cpu {

void moe_route(const Tensor& logits, int64_t k, Tensor& probs, Tensor& lse, Tensor& experts, Tensor& weights,
               Tensor& stats) {
  const int64_t N = logits.dim(0), E = logits.dim(1);
  const float* r = logits.data<float>();
  float* pr = probs.data<float>();
  float* l = lse.data<float>();
  int32_t* ex = experts.data<int32_t>();
  float* w = weights.data<float>();
#pragma omp parallel for schedule(static) if (N * E >= kParallelMinElements)
  for (int64_t i = 0; i < N; ++i) route_row(r + i * E, E, k, pr + i * E, l[i], ex + i * k, w + i * k);
  double* st = stats.data<double>();
  for (int64_t i = 0; i < N; ++i) {
    for (int64_t e = 0; e < E; ++e) st[e] += pr[i * E + e];
    for (int64_t s = 0; s < k; ++s) st[E + ex[i * k + s]] += 1.0;
    st[2 * E] += static_cast<double>(l[i]) * l[i];
  }
}

void moe_dispatch(const Tensor& experts, int64_t first, int64_t count, Tensor& order, Tensor& slot_of,
                  Tensor& offsets) {
  const int64_t assignments = experts.numel();
  const int32_t* ex = experts.data<int32_t>();
  int32_t* ord = order.data<int32_t>();
  int32_t* slot = slot_of.data<int32_t>();
  int32_t* off = offsets.data<int32_t>();
  const int64_t k = experts.dim(1);
  std::vector<int32_t> next(count + 1, 0);
  for (int64_t a = 0; a < assignments; ++a)
    if (ex[a] >= first && ex[a] < first + count) ++next[ex[a] - first + 1];
  for (int64_t e = 0; e < count; ++e) next[e + 1] += next[e];
  std::copy(next.begin(), next.end(), off);
  for (int64_t a = 0; a < assignments; ++a) {  // a = r·k + s, rows ascending: stable
    const int64_t e = ex[a] - first;
    if (e < 0 || e >= count) {
      slot[a] = -1;
      continue;
    }
    slot[a] = next[e];
    ord[next[e]++] = static_cast<int32_t>(a / k);
  }
}

void moe_combine(const Tensor& y, const Tensor& slot_of, const Tensor* weights, Tensor& out) {
  const int64_t N = out.dim(0), D = out.dim(1), k = slot_of.dim(1);
  const float* ys = y.data<float>();
  const int32_t* slot = slot_of.data<int32_t>();
  const float* w = weights ? weights->data<float>() : nullptr;
  float* o = out.data<float>();
#pragma omp parallel for schedule(static) if (N * D >= kParallelMinElements)
  for (int64_t i = 0; i < N; ++i)
    for (int64_t s = 0; s < k; ++s) {
      const int64_t p = slot[i * k + s];
      if (p < 0) continue;
      const float ws = w ? w[i * k + s] : 1.0f;
      for (int64_t d = 0; d < D; ++d) o[i * D + d] += ws * ys[p * D + d];
    }
}

void moe_combine_backward(const Tensor& dout, const Tensor& y, const Tensor& slot_of, const Tensor& weights,
                          Tensor& dy, Tensor& dweights) {
  const int64_t N = dout.dim(0), D = dout.dim(1), k = slot_of.dim(1);
  const float* g = dout.data<float>();
  const float* ys = y.data<float>();
  const int32_t* slot = slot_of.data<int32_t>();
  const float* w = weights.data<float>();
  float* dys = dy.data<float>();
  float* dw = dweights.data<float>();
#pragma omp parallel for schedule(static) if (N * D >= kParallelMinElements)
  for (int64_t i = 0; i < N; ++i)
    for (int64_t s = 0; s < k; ++s) {
      const int64_t p = slot[i * k + s];
      float dot = 0.0f;
      if (p >= 0)
        for (int64_t d = 0; d < D; ++d) {
          dys[p * D + d] = w[i * k + s] * g[i * D + d];
          dot += g[i * D + d] * ys[p * D + d];
        }
      dw[i * k + s] = dot;
    }
}

void moe_weights_backward(const Tensor& probs, const Tensor& experts, const Tensor& weights, const Tensor& dweights,
                          Tensor& dprobs) {
  const int64_t N = probs.dim(0), E = probs.dim(1), k = experts.dim(1);
  const float* pr = probs.data<float>();
  const int32_t* ex = experts.data<int32_t>();
  const float* w = weights.data<float>();
  const float* dw = dweights.data<float>();
  float* dpr = dprobs.data<float>();
#pragma omp parallel for schedule(static) if (N * E >= kParallelMinElements)
  for (int64_t i = 0; i < N; ++i)
    route_weights_backward_row(pr + i * E, ex + i * k, w + i * k, dw + i * k, E, k, dpr + i * E);
}

void moe_logits_backward(const Tensor& probs, const Tensor& lse, const Tensor& dprobs, const Tensor& stats, int64_t k,
                         double balance, double z, Tensor& dlogits) {
  const int64_t N = probs.dim(0), E = probs.dim(1);
  const double* st = stats.data<double>();
  double assignments = 0.0;  // Nt·k
  for (int64_t e = 0; e < E; ++e) assignments += st[E + e];
  const double rows = assignments / k;
  std::vector<float> share(E);
  for (int64_t e = 0; e < E; ++e) share[e] = static_cast<float>(st[E + e] / assignments);
  const float balance_n = static_cast<float>(balance * E / rows), z_n = static_cast<float>(z * 2.0 / rows);
  const float* pr = probs.data<float>();
  const float* l = lse.data<float>();
  const float* dpr = dprobs.data<float>();
  float* dr = dlogits.data<float>();
#pragma omp parallel for schedule(static) if (N * E >= kParallelMinElements)
  for (int64_t i = 0; i < N; ++i)
    route_logits_backward_row(pr + i * E, l[i], dpr + i * E, share.data(), E, balance_n, z_n, dr + i * E);
}

}  // namespace palmcore::cpu
