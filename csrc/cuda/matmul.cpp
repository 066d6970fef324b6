// C = alpha · op(A) @ op(B) + beta · C through cuBLASLt (shapes and dtypes checked in ops.cpp):
// A and B both float32 or both bfloat16, C float32 (or bfloat16 after bfloat16 inputs: the
// float32 result rounded to nearest, as the CPU rounds it), always accumulated in float32
// (CUBLAS_COMPUTE_32F: never TF32, so the float32 mode stays the exact one).
//
// cuBLASLt is column-major, and a row-major [r, c] matrix is the column-major [c, r] one with
// the same bytes, so the row-major C = op(A) op(B) is computed as the column-major
// C^T = op(B)^T op(A)^T: B goes first, A second, and m and n swap.
//
// cuBLASLt's heuristic is asked once per shape (dimensions, transposes, dtype, alignments and
// device): its answer is kept in a process-wide cache, so a training step's repeated GEMMs
// go straight to cublasLtMatmul.
#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <tuple>

#include "cuda/context.h"
#include "cuda/cublaslt.h"

namespace palmcore::cuda {
namespace {

// cuBLASLt's descriptors, destroyed when they go out of scope.
struct Layout {
  cublasLtMatrixLayout_t handle = nullptr;
  // The column-major view of a row-major [rows, cols] matrix of `type`.
  Layout(cudaDataType_t type, int64_t rows, int64_t cols) {
    check_cublas(cublaslt()->layout_create(&handle, type, cols, rows, cols), "cublasLtMatrixLayoutCreate");
  }
  ~Layout() { cublaslt()->layout_destroy(handle); }
};
struct MatmulDesc {
  cublasLtMatmulDesc_t handle = nullptr;
  MatmulDesc() { check_cublas(cublaslt()->desc_create(&handle, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate"); }
  ~MatmulDesc() { cublaslt()->desc_destroy(handle); }
  void set_transpose(cublasLtMatmulDescAttributes_t which, bool transpose) {
    const cublasOperation_t op = transpose ? CUBLAS_OP_T : CUBLAS_OP_N;
    check_cublas(cublaslt()->desc_set(handle, which, &op, sizeof op), "cublasLtMatmulDescSetAttribute");
  }
};
struct Preference {
  cublasLtMatmulPreference_t handle = nullptr;
  Preference() { check_cublas(cublaslt()->preference_create(&handle), "cublasLtMatmulPreferenceCreate"); }
  ~Preference() { cublaslt()->preference_destroy(handle); }
  template <typename T>
  void set(cublasLtMatmulPreferenceAttributes_t which, T value) {
    check_cublas(cublaslt()->preference_set(handle, which, &value, sizeof value), "cublasLtMatmulPreferenceSetAttribute");
  }
};

// The largest power of two (at most 256) dividing the address: a view into a buffer may start
// anywhere, and cuBLASLt must pick an algorithm that copes with it.
uint32_t alignment(const void* p) {
  const uintptr_t address = reinterpret_cast<uintptr_t>(p);
  return address == 0 ? 256u : static_cast<uint32_t>(std::min<uintptr_t>(address & (~address + 1), 256));
}

// Everything the heuristic's answer depends on.
using ShapeKey = std::tuple<int, int64_t, int64_t, int64_t, bool, bool, int, int, uint32_t, uint32_t, uint32_t>;

struct AlgorithmCache {
  std::mutex mutex;
  std::map<ShapeKey, cublasLtMatmulAlgo_t> algorithms;
};

AlgorithmCache& algorithm_cache() {
  static AlgorithmCache* cache = new AlgorithmCache;  // never destroyed (used until exit)
  return *cache;
}

}  // namespace

void matmul(const Tensor& a, bool transpose_a, const Tensor& b, bool transpose_b, Tensor& c, float alpha,
            float beta) {
  const int64_t m = c.dim(0), n = c.dim(1), k = transpose_a ? a.dim(0) : a.dim(1);
  if (m == 0 || n == 0) return;
  if (k == 0) {  // an empty sum: C = beta · C
    if (beta == 0.0f) return cuda::fill_zero(c);
    if (beta == 1.0f) return;
    throw std::invalid_argument("matmul: k = 0 with beta other than 0 or 1 is not supported on CUDA");
  }
  Context& ctx = context();
  const CublasLt& lt = *cublaslt();
  const cudaDataType_t in = a.dtype() == DType::BF16 ? CUDA_R_16BF : CUDA_R_32F;
  MatmulDesc desc;
  desc.set_transpose(CUBLASLT_MATMUL_DESC_TRANSA, transpose_b);  // the column-major A is our B
  desc.set_transpose(CUBLASLT_MATMUL_DESC_TRANSB, transpose_a);
  const cudaDataType_t result = c.dtype() == DType::BF16 ? CUDA_R_16BF : CUDA_R_32F;
  const Layout first(in, b.dim(0), b.dim(1)), second(in, a.dim(0), a.dim(1)), out(result, m, n);
  const uint32_t align_b = alignment(b.raw_data()), align_a = alignment(a.raw_data()), align_c = alignment(c.raw_data());
  const ShapeKey key{ctx.device, m, n, k, transpose_a, transpose_b, static_cast<int>(in), static_cast<int>(result),
                     align_a, align_b, align_c};
  cublasLtMatmulAlgo_t algo{};
  AlgorithmCache& cache = algorithm_cache();
  bool known = false;
  {
    std::lock_guard<std::mutex> lock(cache.mutex);
    auto it = cache.algorithms.find(key);
    if (it != cache.algorithms.end()) {
      algo = it->second;
      known = true;
    }
  }
  if (!known) {
    Preference preference;
    preference.set(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, static_cast<uint64_t>(ctx.workspace_bytes));
    preference.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_b);
    preference.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_a);
    preference.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_c);
    preference.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_c);
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    check_cublas(lt.heuristic(ctx.lt, desc.handle, first.handle, second.handle, out.handle, out.handle,
                              preference.handle, 1, &result, &found),
                 "matmul (cublasLtMatmulAlgoGetHeuristic)");
    if (found == 0)
      throw std::runtime_error("matmul: cuBLASLt has no algorithm for " + a.shape_string() + " x " + b.shape_string() +
                               " -> " + c.shape_string() + " (k = " + std::to_string(k) + ")");
    algo = result.algo;
    std::lock_guard<std::mutex> lock(cache.mutex);
    cache.algorithms.emplace(key, algo);
  }
  check_cublas(lt.matmul(ctx.lt, desc.handle, &alpha, b.raw_data(), first.handle, a.raw_data(), second.handle, &beta,
                         c.raw_data(), out.handle, c.raw_data(), out.handle, &algo, ctx.workspace,
                         ctx.workspace_bytes, ctx.stream()),
               "matmul (cublasLtMatmul)");
}

}  // namespace palmcore::cuda
