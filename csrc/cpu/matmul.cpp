// C = alpha · op(A) @ op(B) + beta · C through the BLAS (scipy-openblas32, prefixed symbols).
//
// The BLAS runs single-threaded inside our OpenMP threads: the output is cut into slices along
// its longer side and each slice is one BLAS call. The cut depends on the shape alone, never on
// the thread count, so each element comes from the same call and the same summation order
// whatever the number of threads (bit-identical results), and only one thread pool exists
// (two pools, OpenMP's and the BLAS's, spin against each other on a small machine).
#include <algorithm>
#include <cstdint>
#include <stdexcept>

#include "cblas.h"
#include "cpu/cpu_ops.h"

namespace palmcore::cpu {
namespace {

// Rows or columns per BLAS call, at least: each call packs the whole other operand, so thin
// slices would spend their time packing. A product of few rows (a decode step: one row per
// sequence) is a pass over the weights, done by few_rows_gemm without packing: its column
// slices can be much thinner, which spreads the weights' bytes over every thread.
constexpr int64_t kMinSlice = 512;
constexpr int64_t kMinColumnSliceFewRows = 64;
constexpr int64_t kMaxSlices = 16;

}  // namespace

void gemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  // Whoever calls first (the module, a C++ program, a test) pins the BLAS to one thread.
  static const bool single_threaded_blas = [] {
    scipy_openblas_set_num_threads(1);
    return true;
  }();
  (void)single_threaded_blas;
  scipy_cblas_sgemm(CblasRowMajor, transpose_a ? CblasTrans : CblasNoTrans,
                    transpose_b ? CblasTrans : CblasNoTrans, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

namespace {

// The output C [m, n] cut into slices along its longer side, the cut a function of the shape
// alone; part(split_rows, begin, len) computes rows or columns [begin, begin + len), in parallel.
template <typename Part>
void over_slices(int64_t m, int64_t n, bool few_rows, Part&& part) {
  const bool split_rows = m >= n;
  const int64_t extent = split_rows ? m : n;
  const int64_t min_slice = !split_rows && few_rows ? kMinColumnSliceFewRows : kMinSlice;
  const int64_t slices = std::clamp<int64_t>(extent / min_slice, 1, kMaxSlices);
  const int64_t slice = (extent + slices - 1) / slices;
#pragma omp parallel for schedule(static, 1) if (slices > 1)
  for (int64_t s = 0; s < slices; ++s) {
    const int64_t begin = s * slice, len = std::min(extent, begin + slice) - begin;
    if (len > 0) part(split_rows, begin, len);
  }
}

}  // namespace

void matmul(const Tensor& a, bool transpose_a, const Tensor& b, bool transpose_b, Tensor& c,
            float alpha, float beta) {
  const int64_t m = transpose_a ? a.dim(1) : a.dim(0);
  const int64_t k = transpose_a ? a.dim(0) : a.dim(1);
  const int64_t kb = transpose_b ? b.dim(1) : b.dim(0);
  const int64_t n = transpose_b ? b.dim(0) : b.dim(1);
  if (a.ndim() != 2 || b.ndim() != 2 || c.ndim() != 2 || k != kb || c.dim(0) != m || c.dim(1) != n)
    throw std::invalid_argument("matmul: shapes " + a.shape_string() + " x " + b.shape_string() +
                                " -> " + c.shape_string() + " do not agree");
  if (m == 0 || n == 0) return;
  for (int64_t extent : {m, n, k, a.dim(1), b.dim(1)})
    if (extent > INT32_MAX) throw std::invalid_argument("matmul: an extent exceeds the 32-bit BLAS");
  const int64_t lda = a.dim(1), ldb = b.dim(1);
  const bool few_rows = m <= kFewRowsMax && !transpose_a;  // one pass over B: no BLAS repacking
  const float* A = a.data<float>();
  const float* B = b.data<float>();
  float* C = c.data<float>();
  over_slices(m, n, few_rows, [&](bool split_rows, int64_t begin, int64_t len) {
    // Row slice: rows of op(A) and C. Column slice: columns of op(B) and C.
    const float* a_part = split_rows ? A + begin * (transpose_a ? 1 : lda) : A;
    const float* b_part = split_rows ? B : B + begin * (transpose_b ? ldb : 1);
    float* c_part = split_rows ? C + begin * n : C + begin;
    if (few_rows)
      few_rows_gemm(transpose_b, split_rows ? len : m, split_rows ? n : len, k, alpha, a_part, lda, b_part, ldb,
                    beta, c_part, n);
    else
      gemm(transpose_a, transpose_b, split_rows ? len : m, split_rows ? n : len, k, alpha, a_part, lda,
           b_part, ldb, beta, c_part, n);
  });
}

void matmul_compact(const Tensor& a, const CompactWeight& w, Tensor& c, float alpha, float beta) {
  const int64_t m = a.dim(0), n = w.n(), lda = a.dim(1);
  if (m == 0 || n == 0) return;
  const float* A = a.data<float>();
  float* C = c.data<float>();
  over_slices(m, n, true, [&](bool split_rows, int64_t begin, int64_t len) {
    if (split_rows)
      few_rows_gemm_compact(len, n, 0, alpha, A + begin * lda, lda, w, beta, C + begin * n, n);
    else
      few_rows_gemm_compact(m, len, begin, alpha, A, lda, w, beta, C + begin, n);
  });
}

}  // namespace palmcore::cpu
