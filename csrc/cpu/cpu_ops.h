// The CPU backend's kernels: the signatures of palmcore/op_signatures.inc (which give the
// math), one op family per file, OpenMP over rows or heads, BLAS for the matrix products.
#pragma once

#include "palmcore/compact_weights.h"
#include "palmcore/ops.h"

namespace palmcore::cpu {

#include "palmcore/op_signatures.inc"

// One single-threaded BLAS call on raw row-major matrices with leading dimensions:
// C[m, n] = alpha · op(A) @ op(B) + beta · C. The building block of matmul and attention.
void gemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

// C[m, n] = alpha · A @ op(B) + beta · C for few rows m <= kFewRowsMax (decode steps),
// streaming B once (cpu/few_rows_gemm.cpp). Each element sums over k in order: the same bits
// for any m.
constexpr int64_t kFewRowsMax = 64;
void few_rows_gemm(bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                   const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
// The same product with a compact weight (palmcore/compact_weights.h), for its outputs
// [first, first + n): the bits of few_rows_gemm over a float32 copy of the weight's values.
void few_rows_gemm_compact(int64_t m, int64_t n, int64_t first, float alpha, const float* a, int64_t lda,
                           const CompactWeight& w, float beta, float* c, int64_t ldc);
// C = alpha · A @ op(W') + beta · C over every thread (matmul's slices), m <= kFewRowsMax.
void matmul_compact(const Tensor& a, const CompactWeight& w, Tensor& c, float alpha, float beta);
// The compact form of w (host float32 [rows, cols]) and its values into `dequantized`.
void make_compact_weight(const Tensor& w, CompactWeight& compact, Tensor& dequantized);

// Below this many elements an element-wise or row-wise op runs on the calling thread alone:
// opening a parallel region would cost more than the work (a decode step's single rows).
constexpr int64_t kParallelMinElements = int64_t{1} << 14;

// Columns [0, width) in blocks of this many floats: the unit of work of the deterministic
// column-parallel reductions (each output column summed over rows in row order by one thread).
constexpr int64_t kColumnBlock = 64;

}  // namespace palmcore::cpu
