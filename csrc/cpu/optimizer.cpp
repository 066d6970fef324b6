// Optimizer updates over one parameter tensor, and the deterministic sum of squares behind
// gradient-norm clipping and Adafactor's RMS terms; math in palmcore/op_signatures.inc.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/cpu_ops.h"
#include "palmcore/math/training.h"

namespace palmcore::cpu {
namespace {

// Reductions run over fixed chunks of this many elements: per-chunk partial sums in double,
// added in chunk order, so the bits do not depend on the thread count.
constexpr int64_t kChunk = 8192;

// Σ_i term(i) over [0, n), chunked as above; `term` returns a pair of values summed together.
template <typename Term>
std::pair<double, double> chunked_sums(int64_t n, Term term) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> first(chunks), second(chunks);
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    double a = 0.0, b = 0.0;
    for (int64_t i = c * kChunk; i < std::min(n, (c + 1) * kChunk); ++i) {
      const auto [x, y] = term(i);
      a += x;
      b += y;
    }
    first[c] = a;
    second[c] = b;
  }
  double a = 0.0, b = 0.0;
  for (int64_t c = 0; c < chunks; ++c) {
    a += first[c];
    b += second[c];
  }
  return {a, b};
}

// update(i) for every element i of x (in parallel), followed where `rounded` is given by
// rounded[i] = R(x[i]) in the same pass (float32 or bfloat16 storage).
template <typename Update>
void for_each_updated(Tensor& x, Tensor* rounded, Update update) {
  const int64_t n = x.numel();
  const float* xs = x.data<float>();
  auto run = [&](auto* copy) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      update(i);
      if (copy) store_rounded(copy[i], xs[i]);
    }
  };
  if (!rounded)
    run(static_cast<float*>(nullptr));
  else if (rounded->dtype() == DType::BF16)
    run(rounded->data<bf16>());
  else
    run(rounded->data<float>());
}

}  // namespace

void sum_squares(const Tensor& x, Tensor& sums, int64_t index) {
  const float* xs = x.data<float>();
  sums.data<double>()[index] = chunked_sums(x.numel(), [&](int64_t i) {
                                 return std::pair<double, double>{double(xs[i]) * xs[i], 0.0};
                               }).first;
}

// Pass 1: second moments, and Σ u² and Σ x_old² for the two RMS terms.
void adafactor_second_moment(const Tensor& x, const Tensor& g, Tensor& v, int64_t step, double grad_scale,
                             const AdafactorSettings& s, Tensor& sums, int64_t index) {
  const float* xs = x.data<float>();
  const float* gs = g.data<float>();
  float* vs = v.data<float>();
  const float beta2 = static_cast<float>(1.0 - std::pow(static_cast<double>(step), -s.decay));
  const float gscale = static_cast<float>(grad_scale), eps = static_cast<float>(s.eps);
  const auto [u2, x2] = chunked_sums(x.numel(), [&](int64_t i) {
    const float u = adafactor_second_moment_element(gs[i], vs[i], beta2, gscale, eps);
    return std::pair<double, double>{double(u) * u, double(xs[i]) * xs[i]};
  });
  sums.data<double>()[index] = u2;
  sums.data<double>()[index + 1] = x2;
}

// Pass 2: clipped update, momentum, parameter.
void adafactor_apply(Tensor& x, const Tensor& g, Tensor& m, const Tensor& v, double lr, double grad_scale,
                     double rms_u, double rms_x, const AdafactorSettings& s, Tensor* rounded) {
  const int64_t n = x.numel();
  float* xs = x.data<float>();
  float* ms = m.data<float>();
  const float* vs = v.data<float>();
  const float* gs = g.data<float>();
  const float gscale = static_cast<float>(grad_scale);
  const float clip_div = static_cast<float>(std::max(1.0, rms_u / s.clip));
  const float step_size = static_cast<float>(lr * std::max(s.min_scale, rms_x));
  const float decay = static_cast<float>(lr * lr), beta1 = static_cast<float>(s.beta1);
  for_each_updated(x, rounded, [&](int64_t i) {
    adafactor_apply_element(xs[i], gs[i], ms[i], vs[i], gscale, clip_div, step_size, decay, beta1);
  });
}

void adamw_update(Tensor& x, const Tensor& g, Tensor& m, Tensor& v, int64_t step, double lr,
                  double grad_scale, const AdamWSettings& s, Tensor* rounded) {
  const int64_t n = x.numel();
  float* xs = x.data<float>();
  float* ms = m.data<float>();
  float* vs = v.data<float>();
  const float* gs = g.data<float>();
  const float b1 = static_cast<float>(s.beta1), b2 = static_cast<float>(s.beta2);
  const float m_hat = static_cast<float>(1.0 / (1.0 - std::pow(s.beta1, double(step))));
  const float v_hat = static_cast<float>(1.0 / (1.0 - std::pow(s.beta2, double(step))));
  const float rate = static_cast<float>(lr), decay = static_cast<float>(lr * s.weight_decay);
  const float gscale = static_cast<float>(grad_scale), eps = static_cast<float>(s.eps);
  for_each_updated(x, rounded, [&](int64_t i) {
    adamw_element(xs[i], gs[i], ms[i], vs[i], b1, b2, m_hat, v_hat, rate, decay, gscale, eps);
  });
}

}  // namespace palmcore::cpu
