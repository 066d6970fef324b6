// C = alpha · op(A) @ op(B) + beta · C through the BLAS (scipy-openblas32, prefixed symbols).
#include <stdexcept>

#include "cpu/cpu_ops.h"
#include "cblas.h"

namespace palmcore::cpu {

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
  scipy_cblas_sgemm(CblasRowMajor, transpose_a ? CblasTrans : CblasNoTrans,
                    transpose_b ? CblasTrans : CblasNoTrans, m, n, k, alpha, a.data<float>(),
                    a.dim(1), b.data<float>(), b.dim(1), beta, c.data<float>(), n);
}

}  // namespace palmcore::cpu
