// The PLAIN reference attention on CUDA (the math is in palmcore/op_signatures.inc): obviously
// correct, deterministic, SIMT only (no tensor cores, no float atomics). The fast flash kernels
// (cuda/flash_attention.cu) sit beside it; this one is the yardstick that tells a wrong algorithm
// from a wrong optimization (PALMCORE_KERNELS=plain), so every choice below is the simplest
// that is still deterministic.
//
// Layouts (as on the CPU, cpu/attention.cpp): q, out, dout, dq [B·T, H·dh]; k, v, dk, dv
// [B·T, Hkv·dh]; lse [B·H·T]; query head h of this shard reads key/value head
// (first_head + h) / group. One thread block of kThreads threads per output row:
//   forward / cached  one block per (b, h, query row i)  -> out_i (and lse_i)
//   backward dq       one block per (b, h, query row i)  -> dq_i
//   backward dk, dv   one block per (b, kv head g, key row j) -> dk_j, dv_j, summed over this
//                     shard's query heads reading g (in head order) and queries i >= j (in order)
// A block walks its keys (or queries) in chunks of kThreads: each thread computes one score
// s = scale · Σ_d q_d k_d (d in order, fmaf) and the values that follow from it, the block then
// accumulates the chunk into its output row with one thread per column d, chunk elements in
// order. Reductions over a block (max, sum) go through a fixed tree in shared memory. Nothing
// depends on scheduling: reruns give the same bits. Scores are recomputed where needed (three
// times per key in the forward pass) instead of held, so no length limit and no scratch.
//
// Per-element math shared with the CPU (PALMCORE_HD): exp_approx (math/exp.h), round_bf16
// (math/bf16.h); the softmax is the CPU's: subtract the row max, exp, sum (in double), multiply
// by 1/sum, round p to bf16 when shape.bf16; lse = max + log(sum).
//
// Storage: float32, or bf16 (load_float / store_float: loads widen, stores round to nearest).
// The AttentionWorkspace (the CPU's per-thread tiles) is not used. Where kernel_choice() is
// Fast and the flash kernels (cuda/flash_attention.cu, tensor cores, bf16) take the shape,
// attention_forward and attention_backward run those instead, and attention_cached runs the
// flash-decoding kernels (cuda/decode_attention.cu).
#include <cfloat>
#include <climits>
#include <cmath>
#include <stdexcept>
#include <string>

#include "cuda/context.h"
#include "cuda/decode_attention.h"
#include "cuda/flash_attention.h"
#include "palmcore/math/bf16.h"
#include "palmcore/math/exp.h"

namespace palmcore::cuda {
namespace {

constexpr int kThreads = 128;  // threads per block: a power of two (the reduction trees)

struct Layout {
  int64_t B, T, H, Hkv, dh, group, first_head, q_stride, kv_stride;
  explicit Layout(const AttentionShape& s)
      : B(s.batch), T(s.seq), H(s.heads), Hkv(s.kv_heads), dh(s.head_dim), group(s.query_group()),
        first_head(s.first_head), q_stride(s.heads * s.head_dim), kv_stride(s.kv_heads * s.head_dim) {}
  __host__ __device__ int64_t kv_of(int64_t h) const { return (first_head + h) / group; }
  __host__ __device__ int64_t q_at(int64_t b, int64_t t, int64_t h) const { return (b * T + t) * q_stride + h * dh; }
  __host__ __device__ int64_t kv_at(int64_t b, int64_t t, int64_t g) const { return (b * T + t) * kv_stride + g * dh; }
};

// Σ_d a_d b_d, d = 0..n-1 in order, one fmaf per term: the same bits wherever it runs. A, B:
// float or bf16 storage (widened exactly).
template <class A, class B>
__device__ float dot(const A* a, const B* b, int64_t n) {
  float s = 0.0f;
  for (int64_t d = 0; d < n; ++d) s = fmaf(load_float(a[d]), load_float(b[d]), s);
  return s;
}

// s = scale · q·k, the product rounded to float before anything uses it (__fmul_rn is never
// contracted into a following subtraction), as the CPU's GEMM stores its scores: every pass and
// both backward kernels see the same bits for one score.
// acc[d] += Σ_jj w[jj] · M[(c0 + jj) · ld + d] for this thread's columns d (d = tid, tid +
// kThreads, ...), jj in order: a chunk of weighted rows (p · V forward, ds' · K backward).
template <class T>
__device__ void accumulate_rows(float* acc, const float* w, const T* M, int64_t ld, int64_t c0, int64_t chunk,
                                int64_t dh, int tid) {
  for (int64_t d = tid; d < dh; d += kThreads) {
    float a = acc[d];
    for (int64_t jj = 0; jj < chunk; ++jj) a = fmaf(w[jj], load_float(M[(c0 + jj) * ld + d]), a);
    acc[d] = a;
  }
}

template <class A, class B>
__device__ float score(float scale, const A* q, const B* k, int64_t dh) { return __fmul_rn(scale, dot(q, k, dh)); }

// The block's max of x (one value per thread), the CPU's comparison (m > x ? m : x), by a fixed
// tree; every thread gets the result. red: kThreads floats of shared memory.
__device__ float block_max(float x, float* red) {
  red[threadIdx.x] = x;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) {
      const float a = red[threadIdx.x], b = red[threadIdx.x + half];
      red[threadIdx.x] = a > b ? a : b;
    }
    __syncthreads();
  }
  const float m = red[0];
  __syncthreads();
  return m;
}

// The block's sum of x (one double per thread), by a fixed tree: deterministic.
__device__ double block_sum(double x, double* red) {
  red[threadIdx.x] = x;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) red[threadIdx.x] += red[threadIdx.x + half];
    __syncthreads();
  }
  const double s = red[0];
  __syncthreads();
  return s;
}

// One query row against keys 0..n-1 (row j of K and V at j · ld), by the whole block:
//   s_j = scale · q·k_j;  m = max_j s_j;  l = Σ_j exp(s_j - m)  (double, then float)
//   p_j = exp(s_j - m) · (1/l)  (rounded to bf16 when bf16);  out = Σ_j p_j v_j  (j in order)
//   lse = m + log(l)  (written by thread 0 when lse is given)
// The one forward routine of the training attention and the cached attention, as attend_block
// is on the CPU. Shared memory: see forward_shared_bytes.
template <class T>
__device__ void attend_row(const T* q, const T* K, const T* V, int64_t ld, int64_t dh, int64_t n, float scale,
                           bool bf16, T* out, float* lse) {
  extern __shared__ double shared[];
  double* red_d = shared;                                  // [kThreads]
  float* red_f = reinterpret_cast<float*>(red_d + kThreads);  // [kThreads]
  float* p = red_f + kThreads;                             // [kThreads]
  float* sq = p + kThreads;                                // [dh]
  float* acc = sq + dh;                                    // [dh]
  const int tid = threadIdx.x;
  for (int64_t d = tid; d < dh; d += kThreads) {
    sq[d] = load_float(q[d]);
    acc[d] = 0.0f;
  }
  __syncthreads();
  // pass 1: the row max
  float m = -INFINITY;
  for (int64_t j = tid; j < n; j += kThreads) {
    const float s = score(scale, sq, K + j * ld, dh);
    m = m > s ? m : s;
  }
  m = block_max(m, red_f);
  // pass 2: the sum of exp(s - m)
  double l_part = 0.0;
  for (int64_t j = tid; j < n; j += kThreads) l_part += exp_approx(score(scale, sq, K + j * ld, dh) - m);
  const float l = static_cast<float>(block_sum(l_part, red_d));
  const float inv_l = 1.0f / l;
  // pass 3: out = Σ_j p_j v_j, a chunk of p at a time, one thread per column
  for (int64_t c0 = 0; c0 < n; c0 += kThreads) {
    const int64_t j = c0 + tid;
    if (j < n) {
      float pj = exp_approx(score(scale, sq, K + j * ld, dh) - m) * inv_l;
      if (bf16) pj = palmcore::round_bf16(pj);
      p[tid] = pj;
    }
    __syncthreads();
    accumulate_rows(acc, p, V, ld, c0, n - c0 < kThreads ? n - c0 : kThreads, dh, tid);
    __syncthreads();
  }
  for (int64_t d = tid; d < dh; d += kThreads) store_float(out[d], acc[d]);
  if (lse && tid == 0) *lse = m + logf(l);
}

size_t forward_shared_bytes(int64_t dh) { return kThreads * sizeof(double) + (2 * kThreads + 2 * dh) * sizeof(float); }

// Forward: block (b, h, i) = blockIdx.x in that order (i fastest).
//   out_i = Σ_{j ≤ i} softmax_j(q_i · k_j / sqrt(dh)) v_j,   lse_(b,h,i) = log Σ_{j ≤ i} exp(q_i · k_j / sqrt(dh))
template <class T>
__global__ void forward_kernel(const T* q, const T* k, const T* v, T* out, float* lse, Layout L, float scale,
                               bool bf16) {
  const int64_t row = blockIdx.x;  // (b · H + h) · T + i: also lse's index
  const int64_t i = row % L.T, h = (row / L.T) % L.H, b = row / (L.T * L.H);
  const int64_t g = L.kv_of(h);
  attend_row(q + L.q_at(b, i, h), k + L.kv_at(b, 0, g), v + L.kv_at(b, 0, g), L.kv_stride, L.dh, i + 1, scale, bf16,
             out + L.q_at(b, i, h), lse + row);
}

// Cached: block (r, h) = blockIdx.x (h fastest). Row r reads slot b = slots[r] at positions
// 0..positions[r] (cache row b · capacity + j):
//   out_r = Σ_{j ≤ p} softmax_j(q_r · K[b, j] / sqrt(dh)) V[b, j]
// A slot or position outside the cache (ops.cpp does not check them: they live on the device)
// gives a NaN row instead of a read out of bounds.
template <class T>
__global__ void cached_kernel(const T* q, const int32_t* slots, const int32_t* positions, const T* k_cache,
                              const T* v_cache, T* out, Layout L, float scale, bool bf16) {
  const int64_t r = blockIdx.x / L.H, h = blockIdx.x % L.H;
  const int64_t slot = slots[r], pos = positions[r], g = L.kv_of(h);  // L.B = slots, L.T = capacity
  T* o = out + r * L.q_stride + h * L.dh;
  if (slot < 0 || slot >= L.B || pos < 0 || pos >= L.T) {
    for (int64_t d = threadIdx.x; d < L.dh; d += kThreads) store_float(o[d], NAN);
    return;
  }
  attend_row(q + r * L.q_stride + h * L.dh, k_cache + L.kv_at(slot, 0, g), v_cache + L.kv_at(slot, 0, g), L.kv_stride,
             L.dh, pos + 1, scale, bf16, o, nullptr);
}

// Backward, the query side: block (b, h, i) = blockIdx.x (i fastest), keys j ≤ i in chunks.
//   p_ij = exp(s_ij - lse_i)   (rounded when bf16; s_ij = scale · q_i·k_j as in the forward pass)
//   D_i = dout_i · out_i       (d in order, fmaf)
//   ds'_ij = p_ij (dout_i · v_j - D_i) · scale   (rounded when bf16)
//   dq_i = Σ_j ds'_ij k_j      (j in order)
template <class T>
__global__ void backward_dq_kernel(const T* q, const T* k, const T* v, const T* out, const float* lse, const T* dout,
                                   T* dq, Layout L, float scale, bool bf16) {
  extern __shared__ double shared[];
  float* ds = reinterpret_cast<float*>(shared);  // [kThreads]
  float* sq = ds + kThreads;                     // [dh]
  float* sdo = sq + L.dh;                        // [dh]
  float* acc = sdo + L.dh;                       // [dh]
  float* sD = acc + L.dh;                        // [1]
  const int64_t row = blockIdx.x;
  const int64_t i = row % L.T, h = (row / L.T) % L.H, b = row / (L.T * L.H);
  const int64_t g = L.kv_of(h), dh = L.dh, n = i + 1;
  const T* K = k + L.kv_at(b, 0, g);
  const T* V = v + L.kv_at(b, 0, g);
  const int tid = threadIdx.x;
  for (int64_t d = tid; d < dh; d += kThreads) {
    sq[d] = load_float(q[L.q_at(b, i, h) + d]);
    sdo[d] = load_float(dout[L.q_at(b, i, h) + d]);
    acc[d] = 0.0f;
  }
  if (tid == 0) *sD = dot(dout + L.q_at(b, i, h), out + L.q_at(b, i, h), dh);
  __syncthreads();
  const float D = *sD, lse_i = lse[row];
  for (int64_t c0 = 0; c0 < n; c0 += kThreads) {
    const int64_t j = c0 + tid;
    if (j < n) {
      float p = exp_approx(score(scale, sq, K + j * L.kv_stride, dh) - lse_i);
      if (bf16) p = palmcore::round_bf16(p);
      float dsj = p * (dot(sdo, V + j * L.kv_stride, dh) - D) * scale;
      if (bf16) dsj = palmcore::round_bf16(dsj);
      ds[tid] = dsj;
    }
    __syncthreads();
    accumulate_rows(acc, ds, K, L.kv_stride, c0, n - c0 < kThreads ? n - c0 : kThreads, dh, tid);
    __syncthreads();
  }
  for (int64_t d = tid; d < dh; d += kThreads) store_float(dq[L.q_at(b, i, h) + d], acc[d]);
}

// Backward, the key side: block (b, g, j) = blockIdx.x (j fastest), one key/value row. p_ij and
// ds'_ij are recomputed exactly as in backward_dq_kernel (same expressions, same bits), D_i too:
//   dk_j = Σ_{h reading g} ( Σ_{i ≥ j} ds'_ij q_(h,i) ),   dv_j = Σ_{h reading g} ( Σ_{i ≥ j} p_ij dout_(h,i) )
// the inner sums over i in order (chunks of queries), then added up head by head in head order
// (as the CPU sums its per-head partials). The heads reading g are this shard's
// [max(0, g·group - first_head), min(H, (g+1)·group - first_head)); none: dk_j = dv_j = 0.
template <class T>
__global__ void backward_dkdv_kernel(const T* q, const T* k, const T* v, const T* out, const float* lse,
                                     const T* dout, T* dk, T* dv, Layout L, float scale, bool bf16) {
  extern __shared__ double shared[];
  float* sp = reinterpret_cast<float*>(shared);  // [kThreads]
  float* sds = sp + kThreads;                    // [kThreads]
  float* sk = sds + kThreads;                    // [dh]
  float* sv = sk + L.dh;                         // [dh]
  float* part_k = sv + L.dh;                     // [dh]
  float* part_v = part_k + L.dh;                 // [dh]
  float* tot_k = part_v + L.dh;                  // [dh]
  float* tot_v = tot_k + L.dh;                   // [dh]
  const int64_t row = blockIdx.x;
  const int64_t j = row % L.T, g = (row / L.T) % L.Hkv, b = row / (L.T * L.Hkv);
  const int64_t dh = L.dh;
  const int tid = threadIdx.x;
  for (int64_t d = tid; d < dh; d += kThreads) {
    sk[d] = load_float(k[L.kv_at(b, j, g) + d]);
    sv[d] = load_float(v[L.kv_at(b, j, g) + d]);
    tot_k[d] = 0.0f;
    tot_v[d] = 0.0f;
  }
  const int64_t lo = g * L.group - L.first_head, hi = (g + 1) * L.group - L.first_head;
  const int64_t h0 = lo > 0 ? lo : 0, h1 = hi < L.H ? hi : L.H;
  for (int64_t h = h0; h < h1; ++h) {
    for (int64_t d = tid; d < dh; d += kThreads) {
      part_k[d] = 0.0f;
      part_v[d] = 0.0f;
    }
    __syncthreads();
    for (int64_t c0 = j; c0 < L.T; c0 += kThreads) {
      const int64_t i = c0 + tid;
      if (i < L.T) {
        const T* qi = q + L.q_at(b, i, h);
        const T* doi = dout + L.q_at(b, i, h);
        const float D = dot(doi, out + L.q_at(b, i, h), dh);
        float p = exp_approx(score(scale, qi, sk, dh) - lse[(b * L.H + h) * L.T + i]);
        if (bf16) p = palmcore::round_bf16(p);
        float ds = p * (dot(doi, sv, dh) - D) * scale;
        if (bf16) ds = palmcore::round_bf16(ds);
        sp[tid] = p;
        sds[tid] = ds;
      }
      __syncthreads();
      const int64_t chunk = L.T - c0 < kThreads ? L.T - c0 : kThreads;
      for (int64_t d = tid; d < dh; d += kThreads) {
        float ak = part_k[d], av = part_v[d];
        for (int64_t ii = 0; ii < chunk; ++ii) {
          ak = fmaf(sds[ii], load_float(q[L.q_at(b, c0 + ii, h) + d]), ak);
          av = fmaf(sp[ii], load_float(dout[L.q_at(b, c0 + ii, h) + d]), av);
        }
        part_k[d] = ak;
        part_v[d] = av;
      }
      __syncthreads();
    }
    for (int64_t d = tid; d < dh; d += kThreads) {
      tot_k[d] += part_k[d];
      tot_v[d] += part_v[d];
    }
  }
  __syncthreads();
  for (int64_t d = tid; d < dh; d += kThreads) {
    store_float(dk[L.kv_at(b, j, g) + d], tot_k[d]);
    store_float(dv[L.kv_at(b, j, g) + d], tot_v[d]);
  }
}

// The grid of `blocks` blocks (one dimension) and its dynamic shared memory, or an
// std::invalid_argument naming the op when either is out of this kernel's reach.
unsigned grid_of(int64_t blocks, size_t shared_bytes, const char* op) {
  if (blocks > INT_MAX)
    throw std::invalid_argument(std::string(op) + ": " + std::to_string(blocks) +
                                " rows (batch · heads · seq) are more than the plain CUDA kernel's grid takes");
  if (shared_bytes > 48 * 1024)
    throw std::invalid_argument(std::string(op) + ": head_dim too large for the plain CUDA kernel's shared memory");
  return static_cast<unsigned>(blocks);
}

float scale_of(const Layout& L) { return 1.0f / std::sqrt(static_cast<float>(L.dh)); }

}  // namespace

void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out, Tensor& lse,
                       const AttentionShape& shape, AttentionWorkspace& ws) {
  (void)ws;
  const Layout L(shape);
  const int64_t rows = L.B * L.H * L.T;
  if (rows == 0 || L.dh == 0) return;
  if (kernel_choice() == KernelChoice::Fast && flash_attention_supports(shape, q.dtype()) &&
      flash_attention_aligned({&q, &k, &v}, {&out}))
    return flash_attention_forward(q, k, v, out, lse, shape);
  const size_t bytes = forward_shared_bytes(L.dh);
  const unsigned grid = grid_of(rows, bytes, "attention_forward");
  with_float_storage(q.dtype(), [&](auto element) {
    using T = decltype(element);
    forward_kernel<<<grid, kThreads, bytes, context().stream()>>>(q.data<T>(), k.data<T>(), v.data<T>(), out.data<T>(),
                                                                lse.data<float>(), L, scale_of(L), shape.bf16);
  });
  check_cuda(cudaGetLastError(), "attention_forward");
}

void attention_cached(const Tensor& q, const Tensor& slots, const Tensor& positions, const Tensor& k_cache,
                      const Tensor& v_cache, Tensor& out, const AttentionShape& shape, AttentionWorkspace& ws) {
  (void)ws;
  const Layout L(shape);  // batch = cache slots, seq = cache capacity
  if (L.first_head != 0 || L.group != L.H / L.Hkv)
    throw std::invalid_argument("attention_cached: a sharded model's heads are not supported");
  const int64_t blocks = q.dim(0) * L.H;
  if (blocks == 0 || L.dh == 0) return;
  if (kernel_choice() == KernelChoice::Fast && decode_attention_supports(shape))
    return decode_attention(q, slots, positions, k_cache, v_cache, out, shape);
  const size_t bytes = forward_shared_bytes(L.dh);
  const unsigned grid = grid_of(blocks, bytes, "attention_cached");
  with_float_storage(q.dtype(), [&](auto element) {
    using T = decltype(element);
    cached_kernel<<<grid, kThreads, bytes, context().stream()>>>(q.data<T>(), slots.data<int32_t>(),
                                                               positions.data<int32_t>(), k_cache.data<T>(),
                                                               v_cache.data<T>(), out.data<T>(), L, scale_of(L),
                                                               shape.bf16);
  });
  check_cuda(cudaGetLastError(), "attention_cached");
}

void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                        const Tensor& dout, Tensor& dq, Tensor& dk, Tensor& dv, const AttentionShape& shape,
                        AttentionWorkspace& ws) {
  const Layout L(shape);
  if (L.B * L.T == 0 || L.dh == 0) return;
  const bool has_row_dot = ws.row_dot.defined() && ws.row_dot.device() == Device::CUDA &&
                           ws.row_dot.dtype() == DType::F32 && ws.row_dot.numel() >= L.B * L.H * L.T;
  if (kernel_choice() == KernelChoice::Fast && has_row_dot && flash_attention_supports(shape, q.dtype()) &&
      flash_attention_aligned({&q, &k, &v, &dout}, {&out, &dq, &dk, &dv}))
    return flash_attention_backward(q, k, v, out, lse, dout, dq, dk, dv, shape, ws.row_dot);
  const Context& ctx = context();
  const float scale = scale_of(L);
  with_float_storage(q.dtype(), [&](auto element) {
    using T = decltype(element);
    if (L.H > 0) {
      const size_t bytes = kThreads * sizeof(float) + (3 * L.dh + 1) * sizeof(float);
      const unsigned grid = grid_of(L.B * L.H * L.T, bytes, "attention_backward");
      backward_dq_kernel<<<grid, kThreads, bytes, ctx.stream()>>>(q.data<T>(), k.data<T>(), v.data<T>(), out.data<T>(),
                                                                lse.data<float>(), dout.data<T>(), dq.data<T>(), L,
                                                                scale, shape.bf16);
      check_cuda(cudaGetLastError(), "attention_backward");
    }
    const size_t bytes = 2 * kThreads * sizeof(float) + 6 * L.dh * sizeof(float);
    const unsigned grid = grid_of(L.B * L.Hkv * L.T, bytes, "attention_backward");
    backward_dkdv_kernel<<<grid, kThreads, bytes, ctx.stream()>>>(q.data<T>(), k.data<T>(), v.data<T>(), out.data<T>(),
                                                                lse.data<float>(), dout.data<T>(), dk.data<T>(),
                                                                dv.data<T>(), L, scale, shape.bf16);
  });
  check_cuda(cudaGetLastError(), "attention_backward");
}

}  // namespace palmcore::cuda
