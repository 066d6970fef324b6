// C = alpha · A @ op(B) + beta · C for a few rows of A (a decode step: one row per sequence).
//
// Such a product is one pass over the weights B. The BLAS would first repack B, which costs
// as much as the product; these kernels stream B once instead. A block of up to 4 rows of A
// times 64 columns of B (or, with B transposed, 4 rows of B) is accumulated in SIMD registers
// over k. Every element of C is a sum over k in increasing order, whatever the row
// count, the block it falls in or the thread count: a row's result is the same bits whether
// it is decoded alone or in a batch (up to the compiler's FMA contraction, fixed per build).
//
// B is read through a weight reader: float32, or a compact form (palmcore/compact_weights.h)
// widened to float32 as it is loaded. Each reader gives the float32 value of the weight, so a
// compact weight gives the bits of the float32 kernel over a float32 copy of its values.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <type_traits>

#include "cpu/cpu_ops.h"
#include "palmcore/compact_weights.h"
#include "palmcore/math/bf16.h"

namespace palmcore::cpu {
namespace {

using f32x16 = float __attribute__((vector_size(64)));
using f32x8 = float __attribute__((vector_size(32)));
using f32x4 = float __attribute__((vector_size(16)));

// Columns of C per block (4 vectors: with 4 rows of A, 16 independent accumulators, enough
// to keep both FMA pipes busy) and rows of B per piece of a block: 96 · 256 bytes = 24 KiB, in L1.
constexpr int kVectors = 4;
constexpr int64_t kBlockColumns = 16 * kVectors;
constexpr int64_t kDepthPiece = 96;
constexpr int64_t kPrefetchRows = 8;

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store16(float* p, f32x16 v) { std::memcpy(p, &v, sizeof v); }

// Weight readers: element (row, col) of B as stored (B [k, n], or [n, k] when transposed), as a
// float32; load16 reads 16 consecutive columns of a row.
struct Float32Weights {
  const float* w;
  int64_t ld;
  f32x16 load16(int64_t row, int64_t col) const { return palmcore::cpu::load16(w + row * ld + col); }
  float at(int64_t row, int64_t col) const { return w[row * ld + col]; }
  const void* address(int64_t row, int64_t col) const { return w + row * ld + col; }
};

// bfloat16: the upper half of a float32 (exact widening).
struct Bf16Weights {
  const uint16_t* w;
  int64_t ld;
  f32x16 load16(int64_t row, int64_t col) const {
    using u16x16 = uint16_t __attribute__((vector_size(32)));
    using u32x16 = uint32_t __attribute__((vector_size(64)));
    u16x16 h;
    std::memcpy(&h, w + row * ld + col, sizeof h);
    const u32x16 bits = __builtin_convertvector(h, u32x16) << 16;
    f32x16 v;
    std::memcpy(&v, &bits, sizeof v);
    return v;
  }
  float at(int64_t row, int64_t col) const { return from_bf16(bf16{w[row * ld + col]}); }
  const void* address(int64_t row, int64_t col) const { return w + row * ld + col; }
};

// 16 int8 as float32 (GCC scalarizes a direct int8 -> float vector conversion)
inline f32x16 widen16(const int8_t* p) {
#ifdef __AVX512F__
  const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  f32x16 out;
  std::memcpy(&out, &v, sizeof out);
  return out;
#else
  using i8x16 = int8_t __attribute__((vector_size(16)));
  using i16x16 = int16_t __attribute__((vector_size(32)));
  using i32x16 = int32_t __attribute__((vector_size(64)));
  i8x16 v;
  std::memcpy(&v, p, sizeof v);
  return __builtin_convertvector(__builtin_convertvector(__builtin_convertvector(v, i16x16), i32x16), f32x16);
#endif
}

// int8 q times its block's float32 scale s (one product, rounded once: w' = q · s). Blocks run
// along k: down the rows of B [k, n] (scales [k / 32, n]), or along a row of B [n, k] (scales
// [n, k / 32], where 16 consecutive columns at a multiple of 16 share one scale).
template <bool kTransposed>
struct Q8Weights {
  const int8_t* q;
  int64_t ld;
  const float* s;
  int64_t lds;
  f32x16 load16(int64_t row, int64_t col) const {
    const f32x16 widened = widen16(q + row * ld + col);
    if constexpr (kTransposed)
      return widened * s[row * lds + col / kQ8Block];
    else
      return widened * palmcore::cpu::load16(s + row / kQ8Block * lds + col);
  }
  float at(int64_t row, int64_t col) const {
    const float scale = kTransposed ? s[row * lds + col / kQ8Block] : s[row / kQ8Block * lds + col];
    return static_cast<float>(q[row * ld + col]) * scale;
  }
  const void* address(int64_t row, int64_t col) const { return q + row * ld + col; }
};

// The 16 lanes summed as a fixed pairwise tree: halves added as vectors (16 -> 8 -> 4 lanes),
// then (q0 + q2) + (q1 + q3).
inline float sum_lanes16(f32x16 v) {
  f32x8 lo8, hi8;
  std::memcpy(&lo8, &v, sizeof lo8);
  std::memcpy(&hi8, reinterpret_cast<const char*>(&v) + sizeof lo8, sizeof hi8);
  const f32x8 h = lo8 + hi8;
  f32x4 lo4, hi4;
  std::memcpy(&lo4, &h, sizeof lo4);
  std::memcpy(&hi4, reinterpret_cast<const char*>(&h) + sizeof lo4, sizeof hi4);
  const f32x4 q = lo4 + hi4;
  return (q[0] + q[2]) + (q[1] + q[3]);
}

inline float finish(float acc, float alpha, float beta, const float* c) {
  return beta == 0.0f ? alpha * acc : alpha * acc + beta * *c;
}

// Partial sums of R rows × 16·V columns with B [k, ≥16·V] row-major, over p in [p0, p1):
//   acc[r] += A[r, p] · B[p, :]      (in and out through `partial`, kBlockColumns per row)
template <int R, int V, typename Weights>
void block_nn(const float* A, int64_t lda, const Weights& B, int64_t j, int64_t p0, int64_t p1, float* partial) {
  f32x16 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = load16(partial + kBlockColumns * r + 16 * v);
  for (int64_t p = p0; p < p1; ++p) {
    // rows of B are ldb apart, each in its own page: the hardware prefetcher cannot follow
    for (int v = 0; v < V; ++v) __builtin_prefetch(B.address(p + kPrefetchRows, j + 16 * v));
    f32x16 b[V];
    for (int v = 0; v < V; ++v) b[v] = B.load16(p, j + 16 * v);
    for (int r = 0; r < R; ++r) {
      const float a = A[r * lda + p];
      for (int v = 0; v < V; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) store16(partial + kBlockColumns * r + 16 * v, acc[r][v]);
}

// C[R rows, NC columns] with B [n, k] row-major (C = A Bᵀ): dot products of rows, in 16 lanes
// over k (then the lanes summed in order), the k tail added last.
template <int R, int NC, typename Weights>
void block_nt(const float* A, int64_t lda, const Weights& B, int64_t j, int64_t k, float alpha, float beta,
              float* C, int64_t ldc) {
  f32x16 acc[R][NC] = {};
  const int64_t k16 = k / 16 * 16;
  for (int64_t p = 0; p < k16; p += 16) {
    f32x16 b[NC];
    for (int c = 0; c < NC; ++c) b[c] = B.load16(j + c, p);
    for (int r = 0; r < R; ++r) {
      const f32x16 a = load16(A + r * lda + p);
      for (int c = 0; c < NC; ++c) acc[r][c] += a * b[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) {
      float s = sum_lanes16(acc[r][c]);
      for (int64_t p = k16; p < k; ++p) s += A[r * lda + p] * B.at(j + c, p);
      C[r * ldc + c] = finish(s, alpha, beta, C + r * ldc + c);
    }
}

// A piece of B widened to float32 once, for several groups of rows to read: rows
// [first_row, first_row + rows) by `width` columns, row-major.
struct WidenedPiece {
  const float* w;
  int64_t first_row, width;
  f32x16 load16(int64_t row, int64_t col) const { return palmcore::cpu::load16(w + (row - first_row) * width + col); }
  float at(int64_t row, int64_t col) const { return w[(row - first_row) * width + col]; }
  const void* address(int64_t, int64_t) const { return w; }  // in L1 already: nothing to prefetch
};

template <typename Weights>
constexpr bool kWidened = !std::is_same_v<Weights, Float32Weights>;
constexpr int64_t kWidenMaxDepth = 2048;  // C = A Bᵀ: the rows of B widened at once, 4 · k floats

// Calls block(R, i) for the rows of A in groups [i, i + R), R <= 4, as compile-time R.
template <typename Block>
void over_row_groups(int64_t m, Block&& block) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) block(std::integral_constant<int, 4>{}, i);
  switch (m - i) {
    case 3: return block(std::integral_constant<int, 3>{}, i);
    case 2: return block(std::integral_constant<int, 2>{}, i);
    case 1: return block(std::integral_constant<int, 1>{}, i);
    default: return;
  }
}

// Column blocks outermost: a block of B is read from memory once and serves every row of A
// while it sits in L1.
template <typename Weights>
void few_rows_product(bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                      const Weights& b, float beta, float* c, int64_t ldc) {
  if (m > kFewRowsMax) throw std::logic_error("few_rows_gemm: more rows than it is made for");
  int64_t j = 0;
  if (transpose_b) {
    // C = A Bᵀ: blocks of NC rows of B (contiguous in memory); with one or two rows of A, 8 of
    // them give enough independent accumulators, with more rows 4 (registers run out).
    // A compact B read by more than one group of rows is widened once per block of rows.
    float widened[kWidened<Weights> ? 4 * kWidenMaxDepth : 1];
    auto columns = [&](auto NC) {
      for (; j + NC <= n; j += NC) {
        if constexpr (kWidened<Weights>) {
          if (m > 4 && k <= kWidenMaxDepth && k % 16 == 0) {
            for (int c = 0; c < NC; ++c)
              for (int64_t p = 0; p < k; p += 16) store16(widened + c * k + p, b.load16(j + c, p));
            const WidenedPiece piece{widened, j, k};
            over_row_groups(m, [&](auto R, int64_t i) {
              block_nt<R, NC>(a + i * lda, lda, piece, j, k, alpha, beta, c + i * ldc + j, ldc);
            });
            continue;
          }
        }
        over_row_groups(m, [&](auto R, int64_t i) {
          block_nt<R, NC>(a + i * lda, lda, b, j, k, alpha, beta, c + i * ldc + j, ldc);
        });
      }
    };
    if (m <= 2) columns(std::integral_constant<int, 8>{});
    columns(std::integral_constant<int, 4>{});
    columns(std::integral_constant<int, 1>{});
    return;
  }
  // B [k, n]: a block of columns is cut along k into pieces that fit L1, each used by every
  // row of A before the next is read; the sums carry across pieces in `partial`. Blocks are
  // kBlockColumns wide, then 16 for the tail, and the last < 16 columns one at a time.
  float partial[kFewRowsMax * kBlockColumns];
  auto columns = [&](auto V) {
    const int64_t width = 16 * V;
    std::fill(partial, partial + m * kBlockColumns, 0.0f);
    for (int64_t p0 = 0; p0 < k; p0 += kDepthPiece) {
      const int64_t p1 = std::min(k, p0 + kDepthPiece);
      if constexpr (kWidened<Weights>) {
        if (m > 4) {  // a compact B read by several groups of rows: widened once per piece
          float widened[kDepthPiece * kBlockColumns];
          for (int64_t p = p0; p < p1; ++p)
            for (int v = 0; v < V; ++v) store16(widened + (p - p0) * kBlockColumns + 16 * v, b.load16(p, j + 16 * v));
          const WidenedPiece piece{widened, p0, kBlockColumns};
          over_row_groups(m, [&](auto R, int64_t i) {
            block_nn<R, V>(a + i * lda, lda, piece, 0, p0, p1, partial + kBlockColumns * i);
          });
          continue;
        }
      }
      over_row_groups(m, [&](auto R, int64_t i) {
        block_nn<R, V>(a + i * lda, lda, b, j, p0, p1, partial + kBlockColumns * i);
      });
    }
    for (int64_t i = 0; i < m; ++i)
      for (int64_t col = 0; col < width; ++col)
        c[i * ldc + j + col] = finish(partial[kBlockColumns * i + col], alpha, beta, c + i * ldc + j + col);
    j += width;
  };
  while (j + kBlockColumns <= n) columns(std::integral_constant<int, kVectors>{});
  while (j + 16 <= n) columns(std::integral_constant<int, 1>{});
  for (; j < n; ++j)
    for (int64_t i = 0; i < m; ++i) {
      float s = 0.0f;
      for (int64_t p = 0; p < k; ++p) s += a[i * lda + p] * b.at(p, j);
      c[i * ldc + j] = finish(s, alpha, beta, c + i * ldc + j);
    }
}

}  // namespace

void few_rows_gemm(bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                   const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  few_rows_product(transpose_b, m, n, k, alpha, a, lda, Float32Weights{b, ldb}, beta, c, ldc);
}

// Outputs [first, first + n) of w (the columns of C a thread's slice computes).
void few_rows_gemm_compact(int64_t m, int64_t n, int64_t first, float alpha, const float* a, int64_t lda,
                           const CompactWeight& w, float beta, float* c, int64_t ldc) {
  const int64_t k = w.k(), ld = w.values.dim(1);
  const bool t = w.transposed;
  if (w.format == WeightFormat::BF16) {
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(w.values.data<bf16>()) + (t ? first * ld : first);
    return few_rows_product(t, m, n, k, alpha, a, lda, Bf16Weights{bits, ld}, beta, c, ldc);
  }
  if (w.format != WeightFormat::Q8) throw std::logic_error("few_rows_gemm_compact: not a compact weight");
  const int64_t lds = w.scales.dim(1);
  const int8_t* q = w.values.data<int8_t>() + (t ? first * ld : first);
  const float* s = w.scales.data<float>() + (t ? first * lds : first);
  if (t) return few_rows_product(true, m, n, k, alpha, a, lda, Q8Weights<true>{q, ld, s, lds}, beta, c, ldc);
  few_rows_product(false, m, n, k, alpha, a, lda, Q8Weights<false>{q, ld, s, lds}, beta, c, ldc);
}

}  // namespace palmcore::cpu
