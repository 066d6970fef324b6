// Causal multi-query / grouped attention, forward and backward; math in palmcore/ops.h.
//
// Work is split by (batch, query head): each task owns its rows of `out`, `lse` and `dq`, and
// its own slice of the partial key/value gradients, which are then summed over the heads of a
// group in head order. No task writes what another writes, so results do not depend on the
// thread count. Keys and values are first transposed to [dh, T] so the score row
// s_j = q · k_j is an axpy over contiguous memory (vectorizes without reassociation).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/cpu_ops.h"

namespace palmcore::cpu {
namespace {

struct Layout {
  int64_t B, T, H, Hkv, dh, group;
  int64_t q_stride() const { return H * dh; }
  int64_t kv_stride() const { return Hkv * dh; }
  explicit Layout(const AttentionShape& s)
      : B(s.batch), T(s.seq), H(s.heads), Hkv(s.kv_heads), dh(s.head_dim), group(s.heads / s.kv_heads) {}
};

// dst[(b·Hkv + g), d, t] = src[b·T + t, g·dh + d]
void transpose_heads(const Layout& L, const float* src, float* dst) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < L.B; ++b)
    for (int64_t g = 0; g < L.Hkv; ++g) {
      float* out = dst + (b * L.Hkv + g) * L.dh * L.T;
      for (int64_t t = 0; t < L.T; ++t) {
        const float* row = src + (b * L.T + t) * L.kv_stride() + g * L.dh;
        for (int64_t d = 0; d < L.dh; ++d) out[d * L.T + t] = row[d];
      }
    }
}

// s[j] = scale · x · cols[:, j] for j < n, with cols laid out [dh, T].
inline void score_row(const float* x, const float* cols, int64_t dh, int64_t T, int64_t n,
                      float scale, float* s) {
  std::fill(s, s + n, 0.0f);
  for (int64_t d = 0; d < dh; ++d) {
    const float xd = x[d] * scale;
    const float* col = cols + d * T;
    for (int64_t j = 0; j < n; ++j) s[j] += xd * col[j];
  }
}

}  // namespace

void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out, Tensor& lse,
                       const AttentionShape& shape, AttentionWorkspace& ws) {
  const Layout L(shape);
  const float scale = 1.0f / std::sqrt(static_cast<float>(L.dh));
  transpose_heads(L, k.data<float>(), ws.keys_t.data<float>());
  const float* qs = q.data<float>();
  const float* vs = v.data<float>();
  const float* kt = ws.keys_t.data<float>();
  float* os = out.data<float>();
  float* lses = lse.data<float>();
#pragma omp parallel
  {
    std::vector<float> s(L.T);
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < L.B; ++b)
      for (int64_t h = 0; h < L.H; ++h) {
        const int64_t g = h / L.group;
        const float* keys = kt + (b * L.Hkv + g) * L.dh * L.T;
        for (int64_t i = 0; i < L.T; ++i) {
          const int64_t n = i + 1;  // causal: keys 0..i
          score_row(qs + (b * L.T + i) * L.q_stride() + h * L.dh, keys, L.dh, L.T, n, scale, s.data());
          const float m = *std::max_element(s.data(), s.data() + n);
          float l = 0.0f;
          for (int64_t j = 0; j < n; ++j) {
            s[j] = std::exp(s[j] - m);
            l += s[j];
          }
          float* o = os + (b * L.T + i) * L.q_stride() + h * L.dh;
          std::fill(o, o + L.dh, 0.0f);
          for (int64_t j = 0; j < n; ++j) {
            const float* vj = vs + (b * L.T + j) * L.kv_stride() + g * L.dh;
            for (int64_t d = 0; d < L.dh; ++d) o[d] += s[j] * vj[d];
          }
          const float inv_l = 1.0f / l;
          for (int64_t d = 0; d < L.dh; ++d) o[d] *= inv_l;
          lses[(b * L.H + h) * L.T + i] = m + std::log(l);
        }
      }
  }
}

void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                        const Tensor& lse, const Tensor& dout, Tensor& dq, Tensor& dk, Tensor& dv,
                        const AttentionShape& shape, AttentionWorkspace& ws) {
  const Layout L(shape);
  const float scale = 1.0f / std::sqrt(static_cast<float>(L.dh));
  transpose_heads(L, k.data<float>(), ws.keys_t.data<float>());
  transpose_heads(L, v.data<float>(), ws.values_t.data<float>());
  const float* qs = q.data<float>();
  const float* ks = k.data<float>();
  const float* os = out.data<float>();
  const float* dos = dout.data<float>();
  const float* lses = lse.data<float>();
  float* dqs = dq.data<float>();
#pragma omp parallel
  {
    std::vector<float> p(L.T), ds(L.T);
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < L.B; ++b)
      for (int64_t h = 0; h < L.H; ++h) {
        const int64_t g = h / L.group;
        const float* keys_t = ws.keys_t.data<float>() + (b * L.Hkv + g) * L.dh * L.T;
        const float* values_t = ws.values_t.data<float>() + (b * L.Hkv + g) * L.dh * L.T;
        float* dk_part = ws.dkeys_part.data<float>() + (b * L.H + h) * L.T * L.dh;
        float* dv_part = ws.dvalues_part.data<float>() + (b * L.H + h) * L.T * L.dh;
        std::fill(dk_part, dk_part + L.T * L.dh, 0.0f);
        std::fill(dv_part, dv_part + L.T * L.dh, 0.0f);
        for (int64_t i = 0; i < L.T; ++i) {
          const int64_t n = i + 1;
          const int64_t qoff = (b * L.T + i) * L.q_stride() + h * L.dh;
          const float* qi = qs + qoff;
          const float* doi = dos + qoff;
          // p_ij = exp(s_ij - lse_i), recomputed; dp_ij = dout_i · v_j
          score_row(qi, keys_t, L.dh, L.T, n, scale, p.data());
          const float lse_i = lses[(b * L.H + h) * L.T + i];
          for (int64_t j = 0; j < n; ++j) p[j] = std::exp(p[j] - lse_i);
          score_row(doi, values_t, L.dh, L.T, n, 1.0f, ds.data());
          float D = 0.0f;
          for (int64_t d = 0; d < L.dh; ++d) D += doi[d] * os[qoff + d];
          // ds_ij = p_ij (dp_ij - D_i), pre-multiplied by the score scale
          for (int64_t j = 0; j < n; ++j) ds[j] = p[j] * (ds[j] - D) * scale;
          float* dqi = dqs + qoff;
          std::fill(dqi, dqi + L.dh, 0.0f);
          for (int64_t j = 0; j < n; ++j) {
            const float* kj = ks + (b * L.T + j) * L.kv_stride() + g * L.dh;
            float* dkj = dk_part + j * L.dh;
            float* dvj = dv_part + j * L.dh;
            for (int64_t d = 0; d < L.dh; ++d) {
              dqi[d] += ds[j] * kj[d];
              dkj[d] += ds[j] * qi[d];
              dvj[d] += p[j] * doi[d];
            }
          }
        }
      }
    // dk[b, t, g] = Σ_{h in group g} dk_part[b, h, t]   (head order: deterministic)
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < L.B; ++b)
      for (int64_t t = 0; t < L.T; ++t)
        for (int64_t g = 0; g < L.Hkv; ++g) {
          float* dkr = dk.data<float>() + (b * L.T + t) * L.kv_stride() + g * L.dh;
          float* dvr = dv.data<float>() + (b * L.T + t) * L.kv_stride() + g * L.dh;
          std::fill(dkr, dkr + L.dh, 0.0f);
          std::fill(dvr, dvr + L.dh, 0.0f);
          for (int64_t h = g * L.group; h < (g + 1) * L.group; ++h) {
            const float* dkp = ws.dkeys_part.data<float>() + ((b * L.H + h) * L.T + t) * L.dh;
            const float* dvp = ws.dvalues_part.data<float>() + ((b * L.H + h) * L.T + t) * L.dh;
            for (int64_t d = 0; d < L.dh; ++d) {
              dkr[d] += dkp[d];
              dvr[d] += dvp[d];
            }
          }
        }
  }
}

}  // namespace palmcore::cpu
