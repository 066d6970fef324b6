// The CPU backend's kernels: the same signatures as palmcore/ops.h (whose comments give the
// math), one op family per file, OpenMP over rows or heads, BLAS for the matrix products.
#pragma once

#include "palmcore/ops.h"

namespace palmcore::cpu {

void matmul(const Tensor& a, bool transpose_a, const Tensor& b, bool transpose_b, Tensor& c,
            float alpha, float beta);
void embedding_forward(const Tensor& table, const Tensor& tokens, Tensor& out);
void embedding_backward(const Tensor& dout, const Tensor& tokens, Tensor& dtable);
void layernorm_forward(const Tensor& x, const Tensor& scale, float eps, Tensor& out, Tensor& xhat,
                       Tensor& rstd);
void layernorm_backward(const Tensor& dout, const Tensor& xhat, const Tensor& rstd,
                        const Tensor& scale, Tensor& dx, Tensor& dscale);
void rope_apply(Tensor& x, const Tensor& positions, const Tensor& cos_table,
                const Tensor& sin_table, int64_t heads, bool inverse);
void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out, Tensor& lse,
                       const AttentionShape& shape, AttentionWorkspace& ws);
void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                        const Tensor& lse, const Tensor& dout, Tensor& dq, Tensor& dk, Tensor& dv,
                        const AttentionShape& shape, AttentionWorkspace& ws);
void swiglu_forward(const Tensor& gate, const Tensor& up, Tensor& out);
void swiglu_backward(const Tensor& gate, const Tensor& up, const Tensor& dout, Tensor& dgate,
                     Tensor& dup);
void cross_entropy_forward_backward(Tensor& logits, const Tensor& targets, float z_loss,
                                    float grad_scale, Tensor& row_ce, Tensor& row_lse);

// One single-threaded BLAS call on raw row-major matrices with leading dimensions:
// C[m, n] = alpha · op(A) @ op(B) + beta · C. The building block of matmul and attention.
void gemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

// Columns [0, width) in blocks of this many floats: the unit of work of the deterministic
// column-parallel reductions (each output column summed over rows in row order by one thread).
constexpr int64_t kColumnBlock = 64;

}  // namespace palmcore::cpu
