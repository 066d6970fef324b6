// Causal multi-query / grouped attention, forward and backward; math in palmcore/ops.h.
//
// Training attention splits work by (batch, query head); each task walks its queries in blocks
// of kAttentionQueryBlock rows. A block needs the keys 0..i1 before its last row, so it holds one [block, i1] tile of
// scores per thread (never a [B, H, T, T] tensor) and does its products as single-threaded
// BLAS calls on strided views of q, k, v. Each task owns its rows of out, lse and dq and its
// own slice of the partial key/value gradients, summed afterwards per group in head order:
// nothing is shared, so the result is the same whatever the thread count.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "cpu/cpu_ops.h"
#include "cpu/vector_math.h"

namespace palmcore::cpu {
namespace {

struct Layout {
  int64_t B, T, H, Hkv, dh, group, first_head, q_stride, kv_stride;
  explicit Layout(const AttentionShape& s)
      : B(s.batch), T(s.seq), H(s.heads), Hkv(s.kv_heads), dh(s.head_dim), group(s.query_group()),
        first_head(s.first_head), q_stride(s.heads * s.head_dim), kv_stride(s.kv_heads * s.head_dim) {}
  // The key/value head that this shard's query head h reads.
  int64_t kv_of(int64_t h) const { return (first_head + h) / group; }
  // Offsets of (batch b, row t, head h) in the q-shaped and kv-shaped activations.
  int64_t q_at(int64_t b, int64_t t, int64_t h) const { return (b * T + t) * q_stride + h * dh; }
  int64_t kv_at(int64_t b, int64_t t, int64_t g) const { return (b * T + t) * kv_stride + g * dh; }
};

// Tile of scores for query rows [i0, i1) against keys [0, i1): s = scale · q kᵀ, row-major
// with leading dimension i1.
void score_tile(const Layout& L, const float* q, const float* k, int64_t b, int64_t h, int64_t i0,
                int64_t i1, float scale, float* s) {
  gemm(false, true, i1 - i0, i1, L.dh, scale, q + L.q_at(b, i0, h), L.q_stride,
       k + L.kv_at(b, 0, L.kv_of(h)), L.kv_stride, 0.0f, s, i1);
}

// One block of queries against keys [0, n): query row i of Q [m, dh] (leading dimension ldq)
// sees keys [0, limit_i), limit_i = first_limit + i · limit_step, n = the last row's limit.
//   s = scale · Q Kᵀ;  p_ij = exp(s_ij - lse_i) for j < limit_i, else 0;  O = p V
// Writes lse_i (to lse[i · lse_stride]) when lse is given. The one forward kernel of both the
// training attention (a block of consecutive queries of one head, limit_step 1) and the
// cached attention (one query of every head in a group, limit_step 0).
void attend_block(const float* Q, int64_t ldq, int64_t m, const float* K, const float* V, int64_t ldkv,
                  int64_t dh, int64_t first_limit, int64_t limit_step, float scale, float* s, float* O,
                  int64_t ldo, float* lse, int64_t lse_stride, bool bf16) {
  const int64_t n = first_limit + (m - 1) * limit_step;
  gemm(false, true, m, n, dh, scale, Q, ldq, K, ldkv, 0.0f, s, n);
  for (int64_t i = 0; i < m; ++i) {
    float* row = s + i * n;
    const int64_t visible = first_limit + i * limit_step;
    const float mx = max_lanes(row, visible);
    for (int64_t j = 0; j < visible; ++j) row[j] = exp_approx(row[j] - mx);
    const float l = static_cast<float>(sum_lanes(row, visible));
    const float inv_l = 1.0f / l;
    for (int64_t j = 0; j < visible; ++j) row[j] *= inv_l;
    if (bf16)
      for (int64_t j = 0; j < visible; ++j) row[j] = palmcore::round_bf16(row[j]);
    std::fill(row + visible, row + n, 0.0f);
    if (lse) lse[i * lse_stride] = mx + std::log(l);
  }
  gemm(false, false, m, dh, n, 1.0f, s, n, V, ldkv, 0.0f, O, ldo);
}

// This thread's two score tiles of the workspace.
float* thread_tiles(AttentionWorkspace& ws) {
  return ws.tiles.data<float>() + omp_get_thread_num() * ws.tiles.numel() / ws.tiles.dim(0);
}

// One pair of score tiles per running thread: more are made when the thread count grew since
// the workspace was sized (the model does not track threads).
void require_tiles(AttentionWorkspace& ws) {
  const int64_t threads = omp_get_max_threads();
  if (threads > ws.tiles.dim(0))
    ws.tiles = Tensor::zeros({threads, ws.tiles.dim(1), ws.tiles.dim(2), ws.tiles.dim(3)}, DType::F32, Device::CPU);
}

}  // namespace

void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out, Tensor& lse,
                       const AttentionShape& shape, AttentionWorkspace& ws) {
  const Layout L(shape);
  const float scale = 1.0f / std::sqrt(static_cast<float>(L.dh));
  const float* qs = q.data<float>();
  const float* ks = k.data<float>();
  const float* vs = v.data<float>();
  float* os = out.data<float>();
  float* lses = lse.data<float>();
  require_tiles(ws);
#pragma omp parallel
  {
    float* s = thread_tiles(ws);
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < L.B; ++b)
      for (int64_t h = 0; h < L.H; ++h)
        for (int64_t i0 = 0; i0 < L.T; i0 += kAttentionQueryBlock) {
          const int64_t i1 = std::min(L.T, i0 + kAttentionQueryBlock), g = L.kv_of(h);
          attend_block(qs + L.q_at(b, i0, h), L.q_stride, i1 - i0, ks + L.kv_at(b, 0, g), vs + L.kv_at(b, 0, g),
                       L.kv_stride, L.dh, i0 + 1, 1, scale, s, os + L.q_at(b, i0, h), L.q_stride,
                       lses + (b * L.H + h) * L.T + i0, 1, shape.bf16);
        }
  }
}

// Rows are cut into runs: consecutive rows of one slot at consecutive positions (a prompt being
// prefilled), at most kAttentionQueryBlock long. A run of one row (a decode step) stacks the
// query heads of each key/value group into one block, so multi-query attention reads each
// cached key once per group, not once per head.
void attention_cached(const Tensor& q, const Tensor& slots, const Tensor& positions, const Tensor& k_cache,
                      const Tensor& v_cache, Tensor& out, const AttentionShape& shape, AttentionWorkspace& ws) {
  const Layout L(shape);  // batch = cache slots, seq = cache capacity
  if (L.first_head != 0 || L.group != L.H / L.Hkv)
    throw std::invalid_argument("attention_cached: a sharded model's heads are not supported");
  const float scale = 1.0f / std::sqrt(static_cast<float>(L.dh));
  const int64_t rows = q.dim(0);
  const int32_t* slot = slots.data<int32_t>();
  const int32_t* pos = positions.data<int32_t>();
  std::vector<int64_t> run_start;
  for (int64_t r = 0; r < rows; ++r)
    if (r == 0 || slot[r] != slot[r - 1] || pos[r] != pos[r - 1] + 1 ||
        r - run_start.back() == kAttentionQueryBlock)
      run_start.push_back(r);
  run_start.push_back(rows);
  const int64_t runs = static_cast<int64_t>(run_start.size()) - 1;
  const float* qs = q.data<float>();
  const float* ks = k_cache.data<float>();
  const float* vs = v_cache.data<float>();
  float* os = out.data<float>();
  require_tiles(ws);
#pragma omp parallel if (runs * L.Hkv > 1)
  {
    float* s = thread_tiles(ws);
#pragma omp for collapse(2) schedule(dynamic)
    for (int64_t run = 0; run < runs; ++run)
      for (int64_t g = 0; g < L.Hkv; ++g) {
        const int64_t r0 = run_start[run], m = run_start[run + 1] - r0;
        const float* K = ks + L.kv_at(slot[r0], 0, g);
        const float* V = vs + L.kv_at(slot[r0], 0, g);
        const int64_t first_limit = pos[r0] + 1;
        if (m == 1) {
          const int64_t h0 = g * L.group;
          attend_block(qs + r0 * L.q_stride + h0 * L.dh, L.dh, L.group, K, V, L.kv_stride, L.dh, first_limit, 0,
                       scale, s, os + r0 * L.q_stride + h0 * L.dh, L.dh, nullptr, 0, shape.bf16);
          continue;
        }
        for (int64_t h = g * L.group; h < (g + 1) * L.group; ++h)
          attend_block(qs + r0 * L.q_stride + h * L.dh, L.q_stride, m, K, V, L.kv_stride, L.dh, first_limit, 1,
                       scale, s, os + r0 * L.q_stride + h * L.dh, L.q_stride, nullptr, 0, shape.bf16);
      }
  }
}

void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                        const Tensor& lse, const Tensor& dout, Tensor& dq, Tensor& dk, Tensor& dv,
                        const AttentionShape& shape, AttentionWorkspace& ws) {
  const Layout L(shape);
  const float scale = 1.0f / std::sqrt(static_cast<float>(L.dh));
  const float* qs = q.data<float>();
  const float* ks = k.data<float>();
  const float* vs = v.data<float>();
  const float* os = out.data<float>();
  const float* dos = dout.data<float>();
  const float* lses = lse.data<float>();
  float* dqs = dq.data<float>();
  require_tiles(ws);
#pragma omp parallel
  {
    float* p = thread_tiles(ws);
    float* ds = p + ws.tiles.dim(2) * L.T;
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < L.B; ++b)
      for (int64_t h = 0; h < L.H; ++h) {
        const int64_t g = L.kv_of(h);
        float* dk_part = ws.dkeys_part.data<float>() + (b * L.H + h) * L.T * L.dh;
        float* dv_part = ws.dvalues_part.data<float>() + (b * L.H + h) * L.T * L.dh;
        std::fill(dk_part, dk_part + L.T * L.dh, 0.0f);
        std::fill(dv_part, dv_part + L.T * L.dh, 0.0f);
        for (int64_t i0 = 0; i0 < L.T; i0 += kAttentionQueryBlock) {
          const int64_t i1 = std::min(L.T, i0 + kAttentionQueryBlock), rows = i1 - i0;
          // p_ij = exp(s_ij - lse_i), recomputed; dp_ij = dout_i · v_j
          score_tile(L, qs, ks, b, h, i0, i1, scale, p);
          gemm(false, true, rows, i1, L.dh, 1.0f, dos + L.q_at(b, i0, h), L.q_stride,
               vs + L.kv_at(b, 0, g), L.kv_stride, 0.0f, ds, i1);
          for (int64_t i = i0; i < i1; ++i) {
            float* prow = p + (i - i0) * i1;
            float* dsrow = ds + (i - i0) * i1;
            const float lse_i = lses[(b * L.H + h) * L.T + i];
            const float* doi = dos + L.q_at(b, i, h);
            const float* oi = os + L.q_at(b, i, h);
            float D = 0.0f;  // D_i = dout_i · out_i = Σ_j p_ij dp_ij
            for (int64_t d = 0; d < L.dh; ++d) D += doi[d] * oi[d];
            const int64_t n = i + 1;
            // ds_ij = p_ij (dp_ij - D_i), pre-multiplied by the score scale
            for (int64_t j = 0; j < n; ++j) {
              prow[j] = exp_approx(prow[j] - lse_i);
              if (shape.bf16) prow[j] = palmcore::round_bf16(prow[j]);
              dsrow[j] = prow[j] * (dsrow[j] - D) * scale;
              if (shape.bf16) dsrow[j] = palmcore::round_bf16(dsrow[j]);
            }
            std::fill(prow + n, prow + i1, 0.0f);
            std::fill(dsrow + n, dsrow + i1, 0.0f);
          }
          // dq_I = ds k;  dk += dsᵀ q_I;  dv += pᵀ dout_I
          gemm(false, false, rows, L.dh, i1, 1.0f, ds, i1, ks + L.kv_at(b, 0, g), L.kv_stride,
               0.0f, dqs + L.q_at(b, i0, h), L.q_stride);
          gemm(true, false, i1, L.dh, rows, 1.0f, ds, i1, qs + L.q_at(b, i0, h), L.q_stride,
               1.0f, dk_part, L.dh);
          gemm(true, false, i1, L.dh, rows, 1.0f, p, i1, dos + L.q_at(b, i0, h), L.q_stride,
               1.0f, dv_part, L.dh);
        }
      }
    // dk[b, t, g] = Σ_{this shard's heads h reading g} dk_part[b, h, t]   (head order: deterministic)
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < L.B; ++b)
      for (int64_t t = 0; t < L.T; ++t)
        for (int64_t g = 0; g < L.Hkv; ++g) {
          float* dkr = dk.data<float>() + L.kv_at(b, t, g);
          float* dvr = dv.data<float>() + L.kv_at(b, t, g);
          std::fill(dkr, dkr + L.dh, 0.0f);
          std::fill(dvr, dvr + L.dh, 0.0f);
          const int64_t h0 = std::max<int64_t>(0, g * L.group - L.first_head);
          const int64_t h1 = std::min(L.H, (g + 1) * L.group - L.first_head);
          for (int64_t h = h0; h < h1; ++h) {
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
