// Flash attention on tensor cores (declared in cuda/flash_attention.h): causal attention over
// bf16 q, k, v with float32 statistics, FA2-style, deterministic. The plain kernels of
// cuda/attention.cu are the reference; this file computes the same quantities in tiles.
//
// Math (scale = 1/sqrt(dh); query head h reads key/value head g = (first_head + h) / group;
// query i attends keys j <= i):
//   forward                                     backward (D_i = dout_i · out_i, the row_dot)
//   s_ij = scale · q_i·k_j                       s_ij, p_ij = exp(s_ij - lse_i)   (recomputed)
//   m_i = max_j s_ij, l_i = Σ_j exp(s_ij - m_i)  dp_ij = dout_i·v_j
//   out_i = Σ_j exp(s_ij - m_i) v_j / l_i        ds'_ij = p_ij (dp_ij - D_i) · scale
//   lse_i = m_i + log(l_i)                       dq_i = Σ_j ds'_ij k_j,  dk_j = Σ_(h,i) ds'_ij q_i,
//                                                dv_j = Σ_(h,i) p_ij dout_i   (h: heads reading g)
// Exponentials are exp2f of log2-scaled scores (s · log2 e), so m is kept in log2 units and
// lse = m · ln 2 + log(l) is written in natural units, as the plain kernel writes it.
//
// Tiling: blocks of kBlock = 64 queries and 64 keys; 4 warps per CTA, each warp owns 16 rows
// of its CTA's 64 (queries, or keys in the dk/dv kernel) and computes them with
// mma.m16n8k16 (bf16 x bf16 -> f32); operands come from shared memory through ldmatrix (index
// maps in cuda/mma_fragments.h). Shared tiles are 64 rows x dh bf16, rows padded by 8 elements
// (16 bytes) so the 8 rows of one ldmatrix quarter hit distinct banks; the streamed tiles are
// double-buffered with cp.async (the next block loads while this one is computed); rows past T
// are zero-filled.
//   forward   CTA (b, h, query block): Q in registers, K/V blocks 0..qb streamed; the online
//             softmax keeps m and l per row in float32; blocks above the diagonal are never
//             visited, the diagonal block masks j > i.
//   row_dot   one warp per (b, h, i): D_i = Σ_d dout·out in float32.
//   dk/dv     CTA (b, g, key block kb): K, V of the block stay in shared memory; the CTA walks
//             the heads reading g in head order and, for each, the query blocks kb..last,
//             streaming Q, dout, lse and D; dk, dv accumulate in registers, written once.
//   dq        CTA (b, h, query block qb): Q and dout stay in shared memory, K/V blocks 0..qb
//             are streamed; dq accumulates in registers.
// Every CTA covers one kv head, so it loads each K/V block once; the query heads sharing a kv
// head are adjacent in the grid (head fastest) so their CTAs run together and share the K/V
// blocks in L2. The longest rows are scheduled first (causal load balance).
//
// Rounding: scores and every sum accumulate in float32 (tensor cores); p is rounded to bf16
// (nearest even) before p·V and p·dout, and the rounded p is the one ds' uses; ds' is rounded to
// bf16 before ds'·K and ds'ᵀ·Q; out, dq, dk, dv are rounded to bf16 once, at the end. l sums the
// unrounded exponentials. Rows past T in the backward pass get lse = +inf (p = 0) and D = 0.
//
// Determinism: no atomics; every output element is owned by one thread of one CTA, which
// accumulates it in a fixed order (key blocks, heads and query blocks in order, mma k-steps in
// order, the fixed shuffle trees of the row statistics), independent of scheduling.
#include <climits>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "cuda/context.h"
#include "cuda/flash_attention.h"
#include "cuda/mma_fragments.h"
#include "cuda/tensor_core.h"

namespace palmcore::cuda {
namespace {

constexpr int kBlock = 64;                 // queries and keys per block
constexpr int kWarps = 4;                  // each owns kBlock / kWarps = 16 rows
constexpr int kThreads = 32 * kWarps;
constexpr int kScoreTiles = kBlock / 8;    // 8-column mma tiles across a block of scores
constexpr int kScoreSteps = kBlock / 16;   // 16-deep mma steps across a block of scores
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

static_assert(kBlock == 16 * kWarps, "one 16-row mma tile per warp");

// A shared-memory tile of kBlock rows of head_dim bf16.
template <int kDim>
struct Tile {
  static constexpr int kStride = kDim + 8;  // elements per row: 16 bytes of padding
  static constexpr int kElems = kBlock * kStride;
  static constexpr int kBytes = kElems * 2;
  static constexpr int kChunks = kDim / 8;   // 16-byte chunks per row
  static constexpr int kSteps = kDim / 16;   // mma steps across head_dim
  static constexpr int kTiles = kDim / 8;    // 8-column mma tiles across head_dim
};

struct Dims {
  int B, T, H, Hkv, group, first_head;
  int blocks;                   // ceil(T / kBlock)
  int64_t q_stride, kv_stride;  // elements per token row: H·dh, Hkv·dh
  float scale, scale_log2;      // 1/sqrt(dh), scale · log2 e
  __device__ int kv_head(int h) const { return (first_head + h) / group; }
};

// The query block of this CTA (forward and dq grids): head h (fastest), batch b, then the
// blocks from the last (the longest causal rows first); qb = the block, i0 = its first query,
// g = h's kv head.
struct QueryBlock {
  int h, b, g, qb, i0;
};
__device__ QueryBlock query_block(const Dims& dims) {
  const int cta = static_cast<int>(blockIdx.x);
  const int h = cta % dims.H, b = (cta / dims.H) % dims.B, qb = dims.blocks - 1 - cta / (dims.H * dims.B);
  return {h, b, dims.kv_head(h), qb, qb * kBlock};
}

// ---- tiles ----------------------------------------------------------------------------------

// Rows row0 .. row0 + kBlock - 1 of a sequence of T rows (`stride` elements apart, kDim
// columns from src) into a tile, asynchronously; rows past T are zeros (written directly).
template <int kDim>
__device__ void load_tile(bf16* tile, const bf16* src, int64_t stride, int row0, int T) {
  using S = Tile<kDim>;
  for (int c = threadIdx.x; c < kBlock * S::kChunks; c += kThreads) {
    const int r = c / S::kChunks, col = (c % S::kChunks) * 8;
    bf16* dst = tile + r * S::kStride + col;
    if (row0 + r < T)
      cp_async16(dst, src + static_cast<int64_t>(row0 + r) * stride + col);
    else
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
  }
}

// Elements row0 .. row0 + kBlock - 1 of a float row of length T into dst, asynchronously;
// past T: `fill`.
__device__ void load_floats(float* dst, const float* src, int row0, int T, float fill) {
  for (int r = threadIdx.x; r < kBlock; r += kThreads) {
    if (row0 + r < T)
      cp_async4(dst + r, src + row0 + r);
    else
      dst[r] = fill;
  }
}

// The warp's A fragment of rows r0.., columns c0.. of a tile.
template <int kDim>
__device__ __forceinline__ void fragment_a(uint32_t (&a)[4], const bf16* tile, int r0, int c0, int lane) {
  ldmatrix_x4(a, tile + (r0 + mma::ldsm_a_row(lane)) * Tile<kDim>::kStride + c0 + mma::ldsm_a_col(lane));
}

// c[n] += a · tileᵀ for the 8-column tiles n of scores: c (16 rows x kBlock columns) = A ·
// tileᵀ over head_dim, A's 16x16 fragment for step ks given by load_a(ks, a), B[d][j] = tile[j][d].
template <int kDim, typename LoadA>
__device__ __forceinline__ void scores(float (&c)[kScoreTiles][4], LoadA load_a, const bf16* tile, int lane) {
  using S = Tile<kDim>;
#pragma unroll
  for (int n = 0; n < kScoreTiles; ++n) c[n][0] = c[n][1] = c[n][2] = c[n][3] = 0.0f;
#pragma unroll
  for (int ks = 0; ks < S::kSteps; ++ks) {
    uint32_t a[4];
    load_a(ks, a);
#pragma unroll
    for (int np = 0; np < kScoreTiles / 2; ++np) {
      uint32_t b[4];
      ldmatrix_x4(b, tile + (16 * np + mma::ldsm_b_row(lane)) * S::kStride + 16 * ks + mma::ldsm_b_col(lane));
      mma_bf16(c[2 * np], a, b[0], b[1]);
      mma_bf16(c[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// acc += W · tile: W the warp's 16 x kBlock weights in score fragments (rounded to bf16 here),
// tile kBlock x head_dim (B[j][d] = tile[j][d], through ldmatrix .trans).
template <int kDim>
__device__ __forceinline__ void add_weighted_rows(float (&acc)[Tile<kDim>::kTiles][4], const float (&w)[kScoreTiles][4],
                                                  const bf16* tile, int lane) {
  using S = Tile<kDim>;
#pragma unroll
  for (int kk = 0; kk < kScoreSteps; ++kk) {
    uint32_t a[4];
    mma::a_from_c(w[2 * kk], w[2 * kk + 1], a);
#pragma unroll
    for (int dp = 0; dp < S::kTiles / 2; ++dp) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, tile + (16 * kk + mma::ldsm_a_row(lane)) * S::kStride + 16 * dp + mma::ldsm_a_col(lane));
      mma_bf16(acc[2 * dp], a, b[0], b[1]);
      mma_bf16(acc[2 * dp + 1], a, b[2], b[3]);
    }
  }
}

// Row `row` (< T) of a [*, stride] bf16 matrix, head columns at col0, from the warp's
// accumulator fragments (row half `half`: values 2·half, 2·half + 1), times `factor`.
template <int kDim>
__device__ __forceinline__ void store_row(bf16* dst, const float (&acc)[Tile<kDim>::kTiles][4], int half, float factor,
                                          int lane) {
#pragma unroll
  for (int n = 0; n < Tile<kDim>::kTiles; ++n)
    *reinterpret_cast<uint32_t*>(dst + 8 * n + mma::c_col(lane, 2 * half)) =
        mma::pack_bf16(acc[n][2 * half] * factor, acc[n][2 * half + 1] * factor);
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ---- kernels --------------------------------------------------------------------------------

// Forward: CTA blockIdx.x = ((blocks - 1 - qb) · B + b) · H + h. Shared: stage s holds the K
// block at tile 2s and the V block at tile 2s + 1; Q passes through tile 2 on its way to
// registers.
template <int kDim>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                   bf16* __restrict__ out, float* __restrict__ lse, Dims dims) {
  using S = Tile<kDim>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  bf16* const shared = reinterpret_cast<bf16*>(shared_bytes);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const QueryBlock block = query_block(dims);
  const int h = block.h, b = block.b, g = block.g, qb = block.qb, i0 = block.i0;
  const int T = dims.T;
  const bf16* q_rows = q + static_cast<int64_t>(b) * T * dims.q_stride + static_cast<int64_t>(h) * kDim;
  const bf16* k_rows = k + static_cast<int64_t>(b) * T * dims.kv_stride + static_cast<int64_t>(g) * kDim;
  const bf16* v_rows = v + static_cast<int64_t>(b) * T * dims.kv_stride + static_cast<int64_t>(g) * kDim;
  auto k_tile = [&](int stage) { return shared + (2 * stage) * S::kElems; };
  auto v_tile = [&](int stage) { return shared + (2 * stage + 1) * S::kElems; };

  load_tile<kDim>(k_tile(1), q_rows, dims.q_stride, i0, T);
  load_tile<kDim>(k_tile(0), k_rows, dims.kv_stride, 0, T);
  load_tile<kDim>(v_tile(0), v_rows, dims.kv_stride, 0, T);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  uint32_t qf[S::kSteps][4];
#pragma unroll
  for (int ks = 0; ks < S::kSteps; ++ks) fragment_a<kDim>(qf[ks], k_tile(1), 16 * warp, 16 * ks, lane);
  __syncthreads();  // tile 2 is free for the next block

  // This thread's two rows (halves 0, 1 of its fragments): queries i0 + row_i[half].
  const int row_i[2] = {i0 + 16 * warp + mma::c_row(lane, 0), i0 + 16 * warp + mma::c_row(lane, 2)};
  float acc[S::kTiles][4] = {};
  float row_max[2] = {-INFINITY, -INFINITY};  // log2 units
  float row_sum[2] = {0.0f, 0.0f};            // this thread's columns only until the end
  for (int kb = 0; kb <= qb; ++kb) {
    const int stage = kb % 2;
    if (kb < qb) {
      load_tile<kDim>(k_tile(stage ^ 1), k_rows, dims.kv_stride, (kb + 1) * kBlock, T);
      load_tile<kDim>(v_tile(stage ^ 1), v_rows, dims.kv_stride, (kb + 1) * kBlock, T);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    float s[kScoreTiles][4];
    scores<kDim>(
        s,
        [&](int ks, uint32_t(&a)[4]) {
#pragma unroll
          for (int r = 0; r < 4; ++r) a[r] = qf[ks][r];
        },
        k_tile(stage), lane);
    // log2 units; the diagonal block masks the keys after the query
#pragma unroll
    for (int n = 0; n < kScoreTiles; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool masked = kb == qb && kb * kBlock + 8 * n + mma::c_col(lane, e) > row_i[e / 2];
        s[n][e] = masked ? -INFINITY : s[n][e] * dims.scale_log2;
      }
    // online softmax: rescale by the new running max, then p = 2^(s - max)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float m = row_max[half];
#pragma unroll
      for (int n = 0; n < kScoreTiles; ++n) m = fmaxf(m, fmaxf(s[n][2 * half], s[n][2 * half + 1]));
      m = quad_max(m);
      const float base = m == -INFINITY ? 0.0f : m;  // no key yet: every p and alpha is 0
      const float alpha = exp2f(row_max[half] - base);
      row_max[half] = m;
      float sum = row_sum[half] * alpha;
#pragma unroll
      for (int n = 0; n < S::kTiles; ++n) {
        acc[n][2 * half] *= alpha;
        acc[n][2 * half + 1] *= alpha;
      }
#pragma unroll
      for (int n = 0; n < kScoreTiles; ++n)
#pragma unroll
        for (int e = 2 * half; e < 2 * half + 2; ++e) {
          s[n][e] = exp2f(s[n][e] - base);
          sum += s[n][e];
        }
      row_sum[half] = sum;
    }
    add_weighted_rows<kDim>(acc, s, v_tile(stage), lane);
    __syncthreads();  // this stage is loaded again two blocks on
  }

#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const float l = quad_sum(row_sum[half]);
    const int i = row_i[half];
    if (i < T) {
      store_row<kDim>(out + (static_cast<int64_t>(b) * T + i) * dims.q_stride + static_cast<int64_t>(h) * kDim, acc,
                      half, 1.0f / l, lane);
      if (lane % 4 == 0) lse[(static_cast<int64_t>(b) * dims.H + h) * T + i] = row_max[half] * kLn2 + logf(l);
    }
  }
}

// D_i = Σ_d dout_i,d · out_i,d (float32, d = lane + 32 e in order, then a fixed shuffle
// tree): one warp per row (b · H + h) · T + i.
template <int kDim>
__global__ void __launch_bounds__(kThreads)
    row_dot_kernel(const bf16* __restrict__ out, const bf16* __restrict__ dout, float* __restrict__ row_dot, Dims dims) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t rows = static_cast<int64_t>(dims.B) * dims.H * dims.T;
  if (row >= rows) return;  // the whole warp
  const int lane = threadIdx.x % 32;
  const int64_t i = row % dims.T, h = (row / dims.T) % dims.H, b = row / (static_cast<int64_t>(dims.T) * dims.H);
  const int64_t at = (b * dims.T + i) * dims.q_stride + h * kDim;
  float sum = 0.0f;
#pragma unroll
  for (int e = 0; e < kDim / 32; ++e) sum = fmaf(from_bf16(dout[at + lane + 32 * e]), from_bf16(out[at + lane + 32 * e]), sum);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) row_dot[row] = sum;
}

// p (rounded to bf16) of the warp's score fragments s (raw q·k), in place: 2^(s · scale log2 e
// - lse2) with lse2 = lse · log2 e of the fragment value's query; 0 where `masked`.
template <typename Lse2, typename Masked>
__device__ __forceinline__ void probabilities(float (&s)[kScoreTiles][4], float scale_log2, Lse2 lse2, Masked masked) {
#pragma unroll
  for (int n = 0; n < kScoreTiles; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float p = exp2f(fmaf(s[n][e], scale_log2, -lse2(n, e)));
      s[n][e] = masked(n, e) ? 0.0f : mma::rounded_bf16(p);
    }
}

// ds' = p (dp - D) · scale rounded to bf16, in place of dp; D of the fragment value's query.
template <typename RowDot>
__device__ __forceinline__ void score_gradients(float (&dp)[kScoreTiles][4], const float (&p)[kScoreTiles][4],
                                                float scale, RowDot row_dot) {
#pragma unroll
  for (int n = 0; n < kScoreTiles; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dp[n][e] = mma::rounded_bf16(p[n][e] * (dp[n][e] - row_dot(n, e)) * scale);
}

// Backward, keys: CTA blockIdx.x = (kb · B + b) · Hkv + g. Shared: K, V of key block kb at
// tiles 0, 1; stage s: Q at tile 2 + 2s, dout at 3 + 2s, then lse and D of its queries
// (2 stages x kBlock floats each).
template <int kDim>
__global__ void __launch_bounds__(kThreads)
    backward_dkdv_kernel(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                         const bf16* __restrict__ dout, const float* __restrict__ lse,
                         const float* __restrict__ row_dot, bf16* __restrict__ dk, bf16* __restrict__ dv, Dims dims) {
  using S = Tile<kDim>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  bf16* const shared = reinterpret_cast<bf16*>(shared_bytes);
  float* const stats = reinterpret_cast<float*>(shared + 6 * S::kElems);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int cta = static_cast<int>(blockIdx.x);
  const int g = cta % dims.Hkv, b = (cta / dims.Hkv) % dims.B, kb = cta / (dims.Hkv * dims.B);
  const int j0 = kb * kBlock, T = dims.T;
  const int64_t kv_at = static_cast<int64_t>(b) * T * dims.kv_stride + static_cast<int64_t>(g) * kDim;
  const bf16* const k_tile = shared;
  const bf16* const v_tile = shared + S::kElems;
  auto q_tile = [&](int stage) { return shared + (2 + 2 * stage) * S::kElems; };
  auto dout_tile = [&](int stage) { return shared + (3 + 2 * stage) * S::kElems; };
  auto lse_of = [&](int stage) { return stats + stage * kBlock; };
  auto dot_of = [&](int stage) { return stats + (2 + stage) * kBlock; };

  // the heads reading g, in order, and for each the query blocks kb .. blocks - 1
  const int64_t lo = static_cast<int64_t>(g) * dims.group - dims.first_head, hi = lo + dims.group;  // int64: no overflow
  const int h_begin = static_cast<int>(lo > 0 ? lo : 0);
  const int h_end = static_cast<int>(hi < dims.H ? hi : dims.H);
  const int q_blocks = dims.blocks - kb;
  const int items = max(0, h_end - h_begin) * q_blocks;
  auto load_item = [&](int item, int stage) {
    const int h = h_begin + item / q_blocks, i0 = (kb + item % q_blocks) * kBlock;
    const int64_t q_at = static_cast<int64_t>(b) * T * dims.q_stride + static_cast<int64_t>(h) * kDim;
    const int64_t stat_at = (static_cast<int64_t>(b) * dims.H + h) * T;
    load_tile<kDim>(q_tile(stage), q + q_at, dims.q_stride, i0, T);
    load_tile<kDim>(dout_tile(stage), dout + q_at, dims.q_stride, i0, T);
    load_floats(lse_of(stage), lse + stat_at, i0, T, INFINITY);
    load_floats(dot_of(stage), row_dot + stat_at, i0, T, 0.0f);
  };

  load_tile<kDim>(shared, k + kv_at, dims.kv_stride, j0, T);
  load_tile<kDim>(shared + S::kElems, v + kv_at, dims.kv_stride, j0, T);
  if (items > 0) load_item(0, 0);
  cp_async_commit();

  // This thread's two key rows (halves 0, 1 of its fragments).
  const int row_j[2] = {j0 + 16 * warp + mma::c_row(lane, 0), j0 + 16 * warp + mma::c_row(lane, 2)};
  float dk_acc[S::kTiles][4] = {};
  float dv_acc[S::kTiles][4] = {};
  for (int item = 0; item < items; ++item) {
    const int stage = item % 2;
    const int i0 = (kb + item % q_blocks) * kBlock;
    if (item + 1 < items) {
      load_item(item + 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const float* lse_s = lse_of(stage);
    const float* dot_s = dot_of(stage);
    // fragment value (n, e) is key row_j[e / 2], query i0 + query(n, e)
    auto query = [&](int n, int e) { return 8 * n + mma::c_col(lane, e); };

    float p[kScoreTiles][4];  // pᵀ: 16 keys x kBlock queries
    scores<kDim>(
        p, [&](int ks, uint32_t(&a)[4]) { fragment_a<kDim>(a, k_tile, 16 * warp, 16 * ks, lane); }, q_tile(stage),
        lane);
    probabilities(
        p, dims.scale_log2, [&](int n, int e) { return lse_s[query(n, e)] * kLog2e; },
        [&](int n, int e) { return row_j[e / 2] > i0 + query(n, e); });
    add_weighted_rows<kDim>(dv_acc, p, dout_tile(stage), lane);

    float ds[kScoreTiles][4];  // dpᵀ = V · doutᵀ, then ds'ᵀ
    scores<kDim>(
        ds, [&](int ks, uint32_t(&a)[4]) { fragment_a<kDim>(a, v_tile, 16 * warp, 16 * ks, lane); },
        dout_tile(stage), lane);
    score_gradients(ds, p, dims.scale, [&](int n, int e) { return dot_s[query(n, e)]; });
    add_weighted_rows<kDim>(dk_acc, ds, q_tile(stage), lane);
    __syncthreads();  // this stage is loaded again two items on
  }
  cp_async_wait<0>();  // nothing in flight at exit (no items: K, V were loaded for nothing)

#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int j = row_j[half];
    if (j < T) {
      const int64_t at = kv_at + static_cast<int64_t>(j) * dims.kv_stride;
      store_row<kDim>(dk + at, dk_acc, half, 1.0f, lane);
      store_row<kDim>(dv + at, dv_acc, half, 1.0f, lane);
    }
  }
}

// Backward, queries: CTA blockIdx.x = ((blocks - 1 - qb) · B + b) · H + h. Shared: Q, dout
// of query block qb at tiles 0, 1; stage s: K at tile 2 + 2s, V at 3 + 2s.
template <int kDim>
__global__ void __launch_bounds__(kThreads)
    backward_dq_kernel(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                       const bf16* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ row_dot,
                       bf16* __restrict__ dq, Dims dims) {
  using S = Tile<kDim>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  bf16* const shared = reinterpret_cast<bf16*>(shared_bytes);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const QueryBlock block = query_block(dims);
  const int h = block.h, b = block.b, g = block.g, qb = block.qb, i0 = block.i0;
  const int T = dims.T;
  const int64_t q_at = static_cast<int64_t>(b) * T * dims.q_stride + static_cast<int64_t>(h) * kDim;
  const int64_t kv_at = static_cast<int64_t>(b) * T * dims.kv_stride + static_cast<int64_t>(g) * kDim;
  const bf16* const q_tile = shared;
  const bf16* const dout_tile = shared + S::kElems;
  auto k_tile = [&](int stage) { return shared + (2 + 2 * stage) * S::kElems; };
  auto v_tile = [&](int stage) { return shared + (3 + 2 * stage) * S::kElems; };

  load_tile<kDim>(shared, q + q_at, dims.q_stride, i0, T);
  load_tile<kDim>(shared + S::kElems, dout + q_at, dims.q_stride, i0, T);
  load_tile<kDim>(k_tile(0), k + kv_at, dims.kv_stride, 0, T);
  load_tile<kDim>(v_tile(0), v + kv_at, dims.kv_stride, 0, T);
  cp_async_commit();

  // This thread's two query rows (halves 0, 1), their lse (log2 units; +inf past T: p = 0) and D.
  const int row_i[2] = {i0 + 16 * warp + mma::c_row(lane, 0), i0 + 16 * warp + mma::c_row(lane, 2)};
  float lse2[2], dot[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t at = (static_cast<int64_t>(b) * dims.H + h) * T + row_i[half];
    lse2[half] = row_i[half] < T ? lse[at] * kLog2e : INFINITY;
    dot[half] = row_i[half] < T ? row_dot[at] : 0.0f;
  }
  float dq_acc[S::kTiles][4] = {};
  for (int kb = 0; kb <= qb; ++kb) {
    const int stage = kb % 2;
    if (kb < qb) {
      load_tile<kDim>(k_tile(stage ^ 1), k + kv_at, dims.kv_stride, (kb + 1) * kBlock, T);
      load_tile<kDim>(v_tile(stage ^ 1), v + kv_at, dims.kv_stride, (kb + 1) * kBlock, T);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    // fragment value (n, e) is query row_i[e / 2], key kb · kBlock + key(n, e)
    auto key = [&](int n, int e) { return 8 * n + mma::c_col(lane, e); };

    float p[kScoreTiles][4];
    scores<kDim>(
        p, [&](int ks, uint32_t(&a)[4]) { fragment_a<kDim>(a, q_tile, 16 * warp, 16 * ks, lane); }, k_tile(stage),
        lane);
    probabilities(
        p, dims.scale_log2, [&](int, int e) { return lse2[e / 2]; },
        [&](int n, int e) { return kb == qb && kb * kBlock + key(n, e) > row_i[e / 2]; });

    float ds[kScoreTiles][4];  // dp = dout · Vᵀ, then ds'
    scores<kDim>(
        ds, [&](int ks, uint32_t(&a)[4]) { fragment_a<kDim>(a, dout_tile, 16 * warp, 16 * ks, lane); },
        v_tile(stage), lane);
    score_gradients(ds, p, dims.scale, [&](int, int e) { return dot[e / 2]; });
    add_weighted_rows<kDim>(dq_acc, ds, k_tile(stage), lane);
    __syncthreads();  // this stage is loaded again two blocks on
  }

#pragma unroll
  for (int half = 0; half < 2; ++half)
    if (row_i[half] < T)
      store_row<kDim>(dq + q_at + static_cast<int64_t>(row_i[half]) * dims.q_stride, dq_acc, half, 1.0f, lane);
}

// ---- host -----------------------------------------------------------------------------------

// The most dynamic shared memory the kernels of head_dim kDim take (dk/dv: 6 tiles and stats).
template <int kDim>
constexpr size_t dkdv_shared_bytes() {
  return 6 * Tile<kDim>::kBytes + 4 * kBlock * sizeof(float);
}

// Whether the ops' device (context(): palmcore's current device, made current here) is sm_80
// or newer and gives a block `bytes` of shared memory; false when CUDA cannot tell. sm_86 /
// sm_89 parts give 99 KiB, short of the dk/dv kernel at dh 128.
bool device_takes(size_t bytes) {
  try {
    const int device = context().device;
    int major = 0, optin = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
      (void)cudaGetLastError();  // leave no sticky error for the next launch check
      return false;
    }
    return major >= 8 && bytes <= static_cast<size_t>(optin);
  } catch (const std::exception&) {  // CUDA unusable: no flash
    return false;
  }
}

// a · b <= limit for non-negative a, b, without overflow.
bool product_within(int64_t a, int64_t b, int64_t limit) { return a == 0 || b <= limit / a; }

Dims dims_of(const AttentionShape& s) {
  Dims d;
  d.B = static_cast<int>(s.batch);
  d.T = static_cast<int>(s.seq);
  d.H = static_cast<int>(s.heads);
  d.Hkv = static_cast<int>(s.kv_heads);
  d.group = static_cast<int>(s.query_group());
  d.first_head = static_cast<int>(s.first_head);
  d.blocks = static_cast<int>((s.seq + kBlock - 1) / kBlock);
  d.q_stride = s.heads * s.head_dim;
  d.kv_stride = s.kv_heads * s.head_dim;
  d.scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
  d.scale_log2 = d.scale * kLog2e;
  return d;
}

bool aligned(std::initializer_list<const Tensor*> tensors, size_t bytes) {
  for (const Tensor* t : tensors)
    if (reinterpret_cast<uintptr_t>(t->raw_data()) % bytes != 0) return false;
  return true;
}

void check_aligned(std::initializer_list<const Tensor*> tensors, size_t bytes, const char* op) {
  if (!aligned(tensors, bytes))
    throw std::invalid_argument(std::string(op) + ": flash attention needs its tensors " + std::to_string(bytes) +
                                "-byte aligned");
}

// The kernel's dynamic shared memory limit raised to `bytes` (above the default 48 KiB).
template <typename Kernel>
void allow_shared(Kernel kernel, size_t bytes, const char* op) {
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)), op);
}

template <int kDim>
void forward(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out, Tensor& lse, const Dims& d) {
  const char* op = "flash_attention_forward";
  const size_t bytes = 4 * Tile<kDim>::kBytes;
  allow_shared(forward_kernel<kDim>, bytes, op);
  forward_kernel<kDim><<<d.blocks * d.B * d.H, kThreads, bytes, context().stream()>>>(
      q.data<bf16>(), k.data<bf16>(), v.data<bf16>(), out.data<bf16>(), lse.data<float>(), d);
  check_cuda(cudaGetLastError(), op);
}

template <int kDim>
void backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
              const Tensor& dout, Tensor& dq, Tensor& dk, Tensor& dv, Tensor& row_dot, const Dims& d) {
  const char* op = "flash_attention_backward";
  const cudaStream_t stream = context().stream();
  const int64_t rows = static_cast<int64_t>(d.B) * d.H * d.T;
  row_dot_kernel<kDim><<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(
      out.data<bf16>(), dout.data<bf16>(), row_dot.data<float>(), d);
  check_cuda(cudaGetLastError(), op);

  const size_t dkdv_bytes = dkdv_shared_bytes<kDim>();
  allow_shared(backward_dkdv_kernel<kDim>, dkdv_bytes, op);
  backward_dkdv_kernel<kDim><<<d.blocks * d.B * d.Hkv, kThreads, dkdv_bytes, stream>>>(
      q.data<bf16>(), k.data<bf16>(), v.data<bf16>(), dout.data<bf16>(), lse.data<float>(), row_dot.data<float>(),
      dk.data<bf16>(), dv.data<bf16>(), d);
  check_cuda(cudaGetLastError(), op);

  const size_t dq_bytes = 6 * Tile<kDim>::kBytes;
  allow_shared(backward_dq_kernel<kDim>, dq_bytes, op);
  backward_dq_kernel<kDim><<<d.blocks * d.B * d.H, kThreads, dq_bytes, stream>>>(
      q.data<bf16>(), k.data<bf16>(), v.data<bf16>(), dout.data<bf16>(), lse.data<float>(), row_dot.data<float>(),
      dq.data<bf16>(), d);
  check_cuda(cudaGetLastError(), op);
}

}  // namespace

bool flash_attention_aligned(std::initializer_list<const Tensor*> loaded, std::initializer_list<const Tensor*> stored) {
  return aligned(loaded, 16) && aligned(stored, 4);
}

bool flash_attention_supports(const AttentionShape& shape, DType dtype) {
  if (dtype != DType::BF16 || !shape.bf16) return false;  // bf16 storage, p and ds' rounded
  if (shape.head_dim != 64 && shape.head_dim != 128) return false;
  if (shape.batch < 1 || shape.seq < 1 || shape.heads < 1 || shape.kv_heads < 1 || shape.first_head < 0) return false;
  if (shape.group < 0 || (shape.group == 0 && shape.heads < shape.kv_heads)) return false;
  const int64_t group = shape.query_group();
  // every query head reads an existing kv head; every index fits an int
  if (shape.first_head > INT_MAX - shape.heads || shape.seq > INT_MAX - kBlock || group > INT_MAX) return false;
  if ((shape.first_head + shape.heads - 1) / group >= shape.kv_heads) return false;
  const int64_t blocks = (shape.seq + kBlock - 1) / kBlock;
  const size_t shared = shape.head_dim == 64 ? dkdv_shared_bytes<64>() : dkdv_shared_bytes<128>();
  return device_takes(shared) && product_within(blocks, shape.batch, INT_MAX) &&
         product_within(blocks * shape.batch, shape.heads, INT_MAX) &&
         product_within(blocks * shape.batch, shape.kv_heads, INT_MAX) &&
         product_within(shape.batch * shape.seq, shape.heads, static_cast<int64_t>(INT_MAX) * kWarps);
}

void flash_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out, Tensor& lse,
                             const AttentionShape& shape) {
  const char* op = "flash_attention_forward";
  if (!flash_attention_supports(shape, q.dtype()))
    throw std::invalid_argument(std::string(op) + ": shape or dtype not supported (check flash_attention_supports)");
  check_aligned({&q, &k, &v}, 16, op);
  check_aligned({&out}, 4, op);
  const Dims d = dims_of(shape);
  if (shape.head_dim == 64)
    forward<64>(q, k, v, out, lse, d);
  else
    forward<128>(q, k, v, out, lse, d);
}

void flash_attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                              const Tensor& dout, Tensor& dq, Tensor& dk, Tensor& dv, const AttentionShape& shape,
                              Tensor& row_dot) {
  const char* op = "flash_attention_backward";
  if (!flash_attention_supports(shape, q.dtype()))
    throw std::invalid_argument(std::string(op) + ": shape or dtype not supported (check flash_attention_supports)");
  check_aligned({&q, &k, &v, &dout}, 16, op);
  check_aligned({&out, &dq, &dk, &dv}, 4, op);
  const int64_t rows = shape.batch * shape.heads * shape.seq;
  if (!row_dot.defined() || row_dot.device() != Device::CUDA || row_dot.dtype() != DType::F32 || row_dot.numel() < rows)
    throw std::invalid_argument(std::string(op) + ": row_dot must be a CUDA float32 tensor of at least B·H·T = " +
                                std::to_string(rows) + " elements (AttentionWorkspace made for the backward pass)");
  const Dims d = dims_of(shape);
  if (shape.head_dim == 64)
    backward<64>(q, k, v, out, lse, dout, dq, dk, dv, row_dot, d);
  else
    backward<128>(q, k, v, out, lse, dout, dq, dk, dv, row_dot, d);
}

}  // namespace palmcore::cuda
