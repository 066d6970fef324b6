// A reference cuBLASLt for the emulated device (include/cublasLt.h). It tests palmcore's glue,
// not NVIDIA's library: the products are naive loops in double, rounded once to float (then to
// bf16 for a bf16 result), so their bits are not cuBLASLt's.
//
// What it checks as cuBLASLt would refuse it: the layouts' shapes agree with the transposes
// (column-major: D is m x n, op(A) m x k, op(B) k x n), ld >= rows, A and B of one type
// (float32 or bfloat16), C and D alike and float32 or bfloat16, the 32F compute and scale types.
// The heuristic's algorithm remembers the problem it was chosen for (shapes, transposes, types
// and the minimum alignments the preference promised); cublasLtMatmul refuses an algorithm used
// for another problem or with pointers less aligned than promised, which a cached algorithm
// reused wrongly would do on a GPU.
#include <cublasLt.h>
#include <dlfcn.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <string>

namespace {

struct Layout {
  cudaDataType_t type;
  uint64_t rows, cols;
  int64_t ld;
};
struct Desc {
  cublasOperation_t transa = CUBLAS_OP_N, transb = CUBLAS_OP_N;
};
struct Preference {
  uint64_t workspace = 0;
  uint32_t align[4] = {256, 256, 256, 256};  // A, B, C, D: what the caller promises
};

}  // namespace

struct cublasLtContext {};
struct cublasLtMatmulDescOpaque_t : Desc {};
struct cublasLtMatrixLayoutOpaque_t : Layout {};
struct cublasLtMatmulPreferenceOpaque_t : Preference {};

namespace {

size_t element_bytes(cudaDataType_t t) { return t == CUDA_R_16BF ? 2 : 4; }

float load(const void* base, cudaDataType_t type, uint64_t index) {
  if (type == CUDA_R_32F) return static_cast<const float*>(base)[index];
  uint16_t bits;
  std::memcpy(&bits, static_cast<const char*>(base) + 2 * index, 2);
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &wide, 4);
  return f;
}

void store(void* base, cudaDataType_t type, uint64_t index, float value) {
  if (type == CUDA_R_32F) {
    static_cast<float*>(base)[index] = value;
    return;
  }
  uint32_t u;
  std::memcpy(&u, &value, 4);
  uint16_t bits = (u & 0x7fffffffu) > 0x7f800000u ? static_cast<uint16_t>((u >> 16) | 0x40u)
                                                   : static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  std::memcpy(static_cast<char*>(base) + 2 * index, &bits, 2);
}

// The problem of D = alpha op(A) op(B) + beta C, or CUBLAS_STATUS_INVALID_VALUE /
// NOT_SUPPORTED when cuBLASLt would refuse it.
struct Problem {
  uint64_t m, n, k;
};
cublasStatus_t problem_of(const Desc& desc, const Layout& a, const Layout& b, const Layout& c, const Layout& d,
                          Problem* p) {
  for (const Layout* l : {&a, &b, &c, &d})
    if (l->ld < static_cast<int64_t>(l->rows) || l->rows == 0 || l->cols == 0) return CUBLAS_STATUS_INVALID_VALUE;
  if (a.type != b.type || c.type != d.type) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (c.rows != d.rows || c.cols != d.cols || c.ld != d.ld) return CUBLAS_STATUS_INVALID_VALUE;
  const uint64_t m = d.rows, n = d.cols;
  const uint64_t a_rows = desc.transa == CUBLAS_OP_N ? a.rows : a.cols, k = desc.transa == CUBLAS_OP_N ? a.cols : a.rows;
  const uint64_t b_rows = desc.transb == CUBLAS_OP_N ? b.rows : b.cols, b_cols = desc.transb == CUBLAS_OP_N ? b.cols : b.rows;
  if (a_rows != m || b_rows != k || b_cols != n) return CUBLAS_STATUS_INVALID_VALUE;
  *p = {m, n, k};
  return CUBLAS_STATUS_SUCCESS;
}

// The algorithm's words: a tag, the problem, and the alignments it was chosen for.
constexpr uint64_t kTag = 0x70616c6d656d75ull;  // "palmemu"
void describe(const Desc& desc, const Layout& a, const Layout& b, const Layout& d, const Problem& p, uint64_t* w) {
  w[0] = kTag;
  w[1] = p.m;
  w[2] = p.n;
  w[3] = p.k;
  w[4] = static_cast<uint64_t>(desc.transa) | static_cast<uint64_t>(desc.transb) << 8 |
         static_cast<uint64_t>(a.type) << 16 | static_cast<uint64_t>(b.type) << 24 | static_cast<uint64_t>(d.type) << 32;
  w[5] = static_cast<uint64_t>(a.ld) << 32 ^ static_cast<uint64_t>(b.ld) << 16 ^ static_cast<uint64_t>(d.ld);
}

uint32_t alignment(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  return a == 0 ? 256u : static_cast<uint32_t>(std::min<uintptr_t>(a & (~a + 1), 256));
}

}  // namespace

extern "C" {

cublasStatus_t cublasLtCreate(cublasLtHandle_t* handle) {
  *handle = new cublasLtContext;
  return CUBLAS_STATUS_SUCCESS;
}

size_t cublasLtGetVersion() { return CUBLAS_VER_MAJOR * 10000 + 100; }

const char* cublasLtGetStatusString(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
  }
  return "CUBLAS_STATUS_UNKNOWN";
}

cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* desc, cublasComputeType_t compute, cudaDataType_t scale) {
  if (compute != CUBLAS_COMPUTE_32F || scale != CUDA_R_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
  *desc = new cublasLtMatmulDescOpaque_t;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t desc) {
  delete desc;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr,
                                              const void* buf, size_t size) {
  if ((attr != CUBLASLT_MATMUL_DESC_TRANSA && attr != CUBLASLT_MATMUL_DESC_TRANSB) || size != sizeof(cublasOperation_t))
    return CUBLAS_STATUS_INVALID_VALUE;
  cublasOperation_t op;
  std::memcpy(&op, buf, size);
  if (op != CUBLAS_OP_N && op != CUBLAS_OP_T) return CUBLAS_STATUS_NOT_SUPPORTED;
  (attr == CUBLASLT_MATMUL_DESC_TRANSA ? desc->transa : desc->transb) = op;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* layout, cudaDataType_t type, uint64_t rows,
                                          uint64_t cols, int64_t ld) {
  if (type != CUDA_R_32F && type != CUDA_R_16BF) return CUBLAS_STATUS_NOT_SUPPORTED;
  *layout = new cublasLtMatrixLayoutOpaque_t;
  static_cast<Layout&>(**layout) = {type, rows, cols, ld};
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t layout) {
  delete layout;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* pref) {
  *pref = new cublasLtMatmulPreferenceOpaque_t;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t pref) {
  delete pref;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t pref,
                                                    cublasLtMatmulPreferenceAttributes_t attr, const void* buf,
                                                    size_t size) {
  if (attr == CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES) {
    if (size != sizeof(uint64_t)) return CUBLAS_STATUS_INVALID_VALUE;
    std::memcpy(&pref->workspace, buf, size);
    return CUBLAS_STATUS_SUCCESS;
  }
  if (attr < CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES || attr > CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES ||
      size != sizeof(uint32_t))
    return CUBLAS_STATUS_INVALID_VALUE;
  std::memcpy(&pref->align[attr - CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES], buf, size);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc,
                                              cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                                              cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t d,
                                              cublasLtMatmulPreference_t pref, int requested,
                                              cublasLtMatmulHeuristicResult_t* results, int* returned) {
  if (!handle || !desc || !pref || requested < 1) return CUBLAS_STATUS_INVALID_VALUE;
  Problem p;
  if (const cublasStatus_t s = problem_of(*desc, *a, *b, *c, *d, &p)) return s;
  results[0] = cublasLtMatmulHeuristicResult_t{};
  describe(*desc, *a, *b, *d, p, results[0].algo.data);
  results[0].algo.data[6] = static_cast<uint64_t>(pref->align[0]) | static_cast<uint64_t>(pref->align[1]) << 16 |
                            static_cast<uint64_t>(pref->align[2]) << 32 | static_cast<uint64_t>(pref->align[3]) << 48;
  results[0].state = CUBLAS_STATUS_SUCCESS;
  results[0].wavesCount = 1.0f;
  *returned = 1;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmul(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, const void* alpha, const void* A,
                              cublasLtMatrixLayout_t a, const void* B, cublasLtMatrixLayout_t b, const void* beta,
                              const void* C, cublasLtMatrixLayout_t c, void* D, cublasLtMatrixLayout_t d,
                              const cublasLtMatmulAlgo_t* algo, void* workspace, size_t workspace_bytes,
                              cudaStream_t stream) {
  (void)workspace;
  (void)workspace_bytes;
  if (!handle || !desc || !algo) return CUBLAS_STATUS_INVALID_VALUE;
  Problem p;
  if (const cublasStatus_t s = problem_of(*desc, *a, *b, *c, *d, &p)) return s;
  uint64_t expected[8] = {};
  describe(*desc, *a, *b, *d, p, expected);
  if (std::memcmp(expected, algo->data, 6 * sizeof(uint64_t)) != 0) return CUBLAS_STATUS_INVALID_VALUE;  // another problem's
  const void* pointers[4] = {A, B, C, D};
  for (int i = 0; i < 4; ++i)
    if (alignment(pointers[i]) < (algo->data[6] >> (16 * i) & 0xffff)) return CUBLAS_STATUS_INVALID_VALUE;
  const Layout la = *a, lb = *b, lc = *c, ld = *d;
  const Desc op = *desc;
  const float s_alpha = *static_cast<const float*>(alpha), s_beta = *static_cast<const float*>(beta);
  const size_t a_bytes = ((la.cols - 1) * la.ld + la.rows) * element_bytes(la.type);
  const size_t b_bytes = ((lb.cols - 1) * lb.ld + lb.rows) * element_bytes(lb.type);
  const size_t d_bytes = ((ld.cols - 1) * ld.ld + ld.rows) * element_bytes(ld.type);
  if (!palmcore_emu::is_device_range(A, a_bytes) || !palmcore_emu::is_device_range(B, b_bytes) ||
      !palmcore_emu::is_device_range(D, d_bytes) || (s_beta != 0.0f && !palmcore_emu::is_device_range(C, d_bytes)))
    return CUBLAS_STATUS_INVALID_VALUE;  // a GPU would fault: an operand outside device memory
  const cudaError_t e = palmcore_emu::enqueue_host_work(stream, "cublasLtMatmul", [=]() -> cudaError_t {
    for (uint64_t j = 0; j < p.n; ++j)
      for (uint64_t i = 0; i < p.m; ++i) {
        double sum = 0.0;
        for (uint64_t l = 0; l < p.k; ++l) {
          const uint64_t ai = op.transa == CUBLAS_OP_N ? i + l * la.ld : l + i * la.ld;
          const uint64_t bi = op.transb == CUBLAS_OP_N ? l + j * lb.ld : j + l * lb.ld;
          sum += static_cast<double>(load(A, la.type, ai)) * load(B, lb.type, bi);
        }
        const uint64_t at = i + j * ld.ld;
        // beta = 0: C is not read (it may hold NaN), as cuBLASLt does
        const double prior = s_beta == 0.0f ? 0.0 : static_cast<double>(s_beta) * load(C, lc.type, i + j * lc.ld);
        store(D, ld.type, at, static_cast<float>(static_cast<double>(s_alpha) * sum + prior));
      }
    return cudaSuccess;
  });
  return e == cudaSuccess ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_EXECUTION_FAILED;
}

}  // extern "C"

namespace palmcore_emu {

void* cublaslt_library() {
  Dl_info info{};
  if (!dladdr(reinterpret_cast<void*>(&cublasLtCreate), &info) || !info.dli_fname) return nullptr;
  return dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD);
}

}  // namespace palmcore_emu
