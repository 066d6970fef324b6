// Flash-decoding: attention_cached (palmcore/op_signatures.inc) split along the cache.
//   out_r = Σ_{j ≤ p} softmax_j(q_r · K[b, j] / sqrt(dh)) V[b, j],   b = slots[r], p = positions[r]
// A decode step has one query row per sequence: the plain kernel's block per (row, head) leaves
// most of a GPU idle and reads every cached key once per query head. Here a block works
// (row r, key/value head g, split s): the cache positions [s·span, min((s + 1)·span, p + 1)),
// for all the query heads reading g at once, so a step reads each cached key and value once per
// group (multi-query: once for all heads). Two passes:
//   pass 1, per (r, h, s):  m = max_j s_j,  l = Σ_j exp(s_j - m),  a = Σ_j R(exp(s_j - m)) v_j
//                           (s_j = q·k_j / sqrt(dh); R rounds to bf16 when shape.bf16, as the
//                           tensor-core kernels round p before p·V)
//   pass 2, per (r, h):     M = max_s m_s,  L = Σ_s l_s exp(m_s - M),  out = Σ_s a_s exp(m_s - M) / L
// In pass 1, warp w takes the split's positions j ≡ w (mod kWarps) in order, lane t the columns
// d ≡ t (mod 32); a score is reduced across the warp by a fixed butterfly, each warp keeps its
// own running (m, l, a) and the warps are merged in warp order. Every order is fixed: the same
// bits on every run. It is not the plain kernel's order (which normalises p before p·V), so the
// two agree within float32 (fp32) or bf16 (bf16) tolerance, not bit for bit.
// exp is palmcore's exp_approx (math/exp.h), the CPU's and the plain kernel's.
#include "cuda/decode_attention.h"

#include <algorithm>
#include <cmath>

#include "cuda/context.h"
#include "palmcore/math/bf16.h"
#include "palmcore/math/exp.h"

namespace palmcore::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kMaxGroup = 16;     // query heads per key/value head
constexpr int kMaxColumns = 8;    // head_dim columns per lane: head_dim <= 256
constexpr int kMaxHeldPerLane = 64;  // group · columns: the running sums a lane holds
// A block's shared memory at most (queries, each warp's m and l, each warp's sums): within the
// 48 KiB every launch may take without raising the kernel's limit.
static_assert((kMaxHeldPerLane * 32 * (1 + kWarps) + 2 * kWarps * kMaxGroup) * sizeof(float) <= 48 * 1024,
              "decode_partial_kernel's shared memory exceeds the default 48 KiB");

struct DecodeLayout {
  int64_t slots, capacity, heads, group, dh, q_stride, kv_stride, splits, span;
};

// Pass 1: block (r, g, s) = (blockIdx.x / Hkv, blockIdx.x % Hkv, blockIdx.y). Partials:
// stats[((r·H + h)·S + s)·2 + {0, 1}] = (m, l), acc[((r·H + h)·S + s)·dh + d] = a_d. A split
// with no position (past p) writes m = -inf, l = 0, a = 0. A slot or position outside the
// cache gives NaN partials (a NaN row, as the plain kernel gives).
template <class T>
__global__ void decode_partial_kernel(const T* q, const int32_t* slots, const int32_t* positions, const T* k_cache,
                                      const T* v_cache, float* stats, float* acc, DecodeLayout L, float scale,
                                      bool bf16) {
  extern __shared__ float shared[];
  float* sq = shared;                           // [group · dh]: the group's queries
  float* warp_m = sq + L.group * L.dh;          // [kWarps · group]
  float* warp_l = warp_m + kWarps * L.group;    // [kWarps · group]
  float* warp_a = warp_l + kWarps * L.group;    // [kWarps · group · dh]
  const int64_t kv_heads = L.heads / L.group;
  const int64_t r = blockIdx.x / kv_heads, g = blockIdx.x % kv_heads, s = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t slot = slots[r], pos = positions[r];
  const bool valid = slot >= 0 && slot < L.slots && pos >= 0 && pos < L.capacity;
  for (int64_t i = threadIdx.x; i < L.group * L.dh; i += kThreads)
    sq[i] = load_float(q[r * L.q_stride + g * L.group * L.dh + i]);
  __syncthreads();
  const int64_t begin = s * L.span, end = valid ? min((s + 1) * L.span, pos + 1) : begin;
  const int columns = static_cast<int>((L.dh + 31) / 32);  // this lane's columns: lane + 32·c
  float m[kMaxGroup], l[kMaxGroup];  // per query head of the group
  float a[kMaxHeldPerLane];           // [group][columns], flattened
  for (int64_t h = 0; h < L.group; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.0f;
    for (int c = 0; c < columns; ++c) a[h * columns + c] = 0.0f;
  }
  for (int64_t j = begin + warp; j < end; j += kWarps) {
    const T* kj = k_cache + (slot * L.capacity + j) * L.kv_stride + g * L.dh;
    const T* vj = v_cache + (slot * L.capacity + j) * L.kv_stride + g * L.dh;
    float kd[kMaxColumns], vd[kMaxColumns];  // this lane's columns of k_j and v_j
    for (int c = 0; c < columns; ++c) {
      const int64_t d = lane + 32 * c;
      kd[c] = d < L.dh ? load_float(kj[d]) : 0.0f;
      vd[c] = d < L.dh ? load_float(vj[d]) : 0.0f;
    }
    for (int64_t h = 0; h < L.group; ++h) {
      float dot = 0.0f;
      for (int c = 0; c < columns; ++c) {
        const int64_t d = lane + 32 * c;
        if (d < L.dh) dot = fmaf(sq[h * L.dh + d], kd[c], dot);
      }
      for (int offset = 16; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
      const float score = __fmul_rn(scale, dot);
      const float m_new = fmaxf(m[h], score);
      const float rescale = exp_approx(m[h] - m_new);  // exp(-inf) = 0 on the first key
      float p = exp_approx(score - m_new);
      l[h] = fmaf(l[h], rescale, p);
      if (bf16) p = palmcore::round_bf16(p);
      for (int c = 0; c < columns; ++c) a[h * columns + c] = fmaf(p, vd[c], a[h * columns + c] * rescale);
      m[h] = m_new;
    }
  }
  // each warp's partials to shared memory, then merged in warp order
  for (int64_t h = 0; h < L.group; ++h) {
    if (lane == 0) {
      warp_m[warp * L.group + h] = m[h];
      warp_l[warp * L.group + h] = l[h];
    }
    for (int c = 0; c < columns; ++c) {
      const int64_t d = lane + 32 * c;
      if (d < L.dh) warp_a[(warp * L.group + h) * L.dh + d] = a[h * columns + c];
    }
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < L.group * L.dh; i += kThreads) {
    const int64_t h = i / L.dh, d = i % L.dh;
    float top = -INFINITY;
    for (int w = 0; w < kWarps; ++w) top = fmaxf(top, warp_m[w * L.group + h]);
    float sum_l = 0.0f, sum_a = 0.0f;
    for (int w = 0; w < kWarps; ++w) {
      const float mw = warp_m[w * L.group + h];
      if (mw == -INFINITY) continue;  // a warp that saw no position
      const float e = exp_approx(mw - top);
      sum_l = fmaf(warp_l[w * L.group + h], e, sum_l);
      sum_a = fmaf(warp_a[(w * L.group + h) * L.dh + d], e, sum_a);
    }
    const int64_t head = g * L.group + h, at = (r * L.heads + head) * L.splits + s;
    if (!valid) top = sum_l = sum_a = NAN;
    acc[at * L.dh + d] = sum_a;
    if (d == 0) {
      stats[2 * at] = top;
      stats[2 * at + 1] = sum_l;
    }
  }
}

// Pass 2: block (r, h) = blockIdx.x (h fastest), threads over the columns; splits in order.
template <class T>
__global__ void decode_combine_kernel(const float* stats, const float* acc, T* out, DecodeLayout L) {
  const int64_t r = blockIdx.x / L.heads, h = blockIdx.x % L.heads;
  const float* st = stats + (r * L.heads + h) * L.splits * 2;
  const float* ac = acc + (r * L.heads + h) * L.splits * L.dh;
  float top = -INFINITY;
  for (int64_t s = 0; s < L.splits; ++s) top = fmaxf(top, st[2 * s]);  // split 0 always has position 0
  for (int64_t d = threadIdx.x; d < L.dh; d += blockDim.x) {
    float sum_l = 0.0f, sum_a = 0.0f;
    for (int64_t s = 0; s < L.splits; ++s) {
      if (st[2 * s] == -INFINITY) continue;  // a split past the row's position
      const float e = exp_approx(st[2 * s] - top);
      sum_l = fmaf(st[2 * s + 1], e, sum_l);
      sum_a = fmaf(ac[s * L.dh + d], e, sum_a);
    }
    store_float(out[r * L.heads * L.dh + h * L.dh + d], sum_a / sum_l);
  }
}

}  // namespace

bool decode_attention_supports(const AttentionShape& shape) {
  if (shape.kv_heads <= 0 || shape.heads % shape.kv_heads || shape.first_head != 0 || shape.head_dim <= 0) return false;
  const int64_t group = shape.heads / shape.kv_heads, columns = (shape.head_dim + 31) / 32;
  return group <= kMaxGroup && columns <= kMaxColumns && group * columns <= kMaxHeldPerLane;
}

void decode_attention(const Tensor& q, const Tensor& slots, const Tensor& positions, const Tensor& k_cache,
                      const Tensor& v_cache, Tensor& out, const AttentionShape& shape) {
  const int64_t rows = q.dim(0);
  if (rows == 0) return;
  DecodeLayout L{shape.batch, shape.seq, shape.heads, shape.heads / shape.kv_heads, shape.head_dim,
                 shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, 1, shape.seq};
  // The splits depend on the cache's capacity alone (never on the batch or the GPU), so a row's
  // sums, hence its bits, are the same alone or in a batch: spans of at least 32 positions, at
  // most 128 splits (a batch-1 step of a 2048-position cache runs 64 blocks per kv head).
  L.span = std::max<int64_t>(32, (L.capacity + 127) / 128);
  L.splits = (L.capacity + L.span - 1) / L.span;
  const int64_t blocks = rows * shape.kv_heads;
  if (blocks > INT32_MAX || rows * L.heads > INT32_MAX)
    throw std::invalid_argument("attention_cached: too many rows for the decode kernel's grid");
  const int64_t partials = rows * L.heads * L.splits;
  const Scratch scratch(static_cast<size_t>(partials * (2 + L.dh)) * sizeof(float));
  float* stats = scratch.as<float>();
  float* acc = stats + 2 * partials;
  const size_t shared_bytes = (L.group * L.dh + 2 * kWarps * L.group + kWarps * L.group * L.dh) * sizeof(float);
  const cudaStream_t stream = context().stream();
  const float scale = 1.0f / std::sqrt(static_cast<float>(L.dh));
  with_float_storage(q.dtype(), [&](auto element) {
    using T = decltype(element);
    decode_partial_kernel<T><<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(L.splits)), kThreads,
                               shared_bytes, stream>>>(q.data<T>(), slots.data<int32_t>(), positions.data<int32_t>(),
                                                       k_cache.data<T>(), v_cache.data<T>(), stats, acc, L, scale,
                                                       shape.bf16);
    check_cuda(cudaGetLastError(), "attention_cached (decode partials)");
    decode_combine_kernel<T><<<static_cast<unsigned>(rows * L.heads), 128, 0, stream>>>(stats, acc, out.data<T>(), L);
    check_cuda(cudaGetLastError(), "attention_cached (decode combine)");
  });
}

}  // namespace palmcore::cuda
