// cuBLASLt for the emulated device: the types, constants and functions palmcore's
// csrc/cuda/matmul.cpp and cublaslt.cpp use, with CUDA's names and values, implemented by a
// reference (csrc/cuda_emulator/cublaslt.cpp: naive loops, double accumulation). It tests
// palmcore's glue around cuBLASLt (layouts, transposes, leading dimensions, types, beta, the
// heuristic query and the algorithm cache), not NVIDIA's library or its bits.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda_runtime.h"

#define CUBLAS_VER_MAJOR 13
#define PALMCORE_EMU_API __attribute__((visibility("default")))

enum cublasStatus_t {
  CUBLAS_STATUS_SUCCESS = 0,
  CUBLAS_STATUS_NOT_INITIALIZED = 1,
  CUBLAS_STATUS_ALLOC_FAILED = 3,
  CUBLAS_STATUS_INVALID_VALUE = 7,
  CUBLAS_STATUS_EXECUTION_FAILED = 13,
  CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_OP_C = 2 };
enum cublasComputeType_t { CUBLAS_COMPUTE_32F = 68 };

enum cublasLtMatmulDescAttributes_t {
  CUBLASLT_MATMUL_DESC_TRANSA = 3,
  CUBLASLT_MATMUL_DESC_TRANSB = 4,
};
enum cublasLtMatmulPreferenceAttributes_t {
  CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES = 1,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES = 5,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES = 6,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES = 7,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES = 8,
};

using cublasLtHandle_t = struct cublasLtContext*;
using cublasLtMatmulDesc_t = struct cublasLtMatmulDescOpaque_t*;
using cublasLtMatrixLayout_t = struct cublasLtMatrixLayoutOpaque_t*;
using cublasLtMatmulPreference_t = struct cublasLtMatmulPreferenceOpaque_t*;
struct cublasLtMatmulAlgo_t {
  uint64_t data[8];
};
struct cublasLtMatmulHeuristicResult_t {
  cublasLtMatmulAlgo_t algo;
  size_t workspaceSize;
  cublasStatus_t state;
  float wavesCount;
  int reserved[4];
};

extern "C" {
PALMCORE_EMU_API cublasStatus_t cublasLtCreate(cublasLtHandle_t* handle);
PALMCORE_EMU_API size_t cublasLtGetVersion();
PALMCORE_EMU_API const char* cublasLtGetStatusString(cublasStatus_t status);
PALMCORE_EMU_API cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* desc, cublasComputeType_t compute,
                                                         cudaDataType_t scale);
PALMCORE_EMU_API cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t desc);
PALMCORE_EMU_API cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t desc,
                                                               cublasLtMatmulDescAttributes_t attr, const void* buf,
                                                               size_t size);
PALMCORE_EMU_API cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* layout, cudaDataType_t type,
                                                           uint64_t rows, uint64_t cols, int64_t ld);
PALMCORE_EMU_API cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t layout);
PALMCORE_EMU_API cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* pref);
PALMCORE_EMU_API cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t pref);
PALMCORE_EMU_API cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t pref,
                                                                     cublasLtMatmulPreferenceAttributes_t attr,
                                                                     const void* buf, size_t size);
PALMCORE_EMU_API cublasStatus_t cublasLtMatmulAlgoGetHeuristic(
    cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
    cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t d, cublasLtMatmulPreference_t pref, int requested,
    cublasLtMatmulHeuristicResult_t* results, int* returned);
PALMCORE_EMU_API cublasStatus_t cublasLtMatmul(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, const void* alpha,
                                               const void* A, cublasLtMatrixLayout_t a, const void* B,
                                               cublasLtMatrixLayout_t b, const void* beta, const void* C,
                                               cublasLtMatrixLayout_t c, void* D, cublasLtMatrixLayout_t d,
                                               const cublasLtMatmulAlgo_t* algo, void* workspace,
                                               size_t workspace_bytes, cudaStream_t stream);
}

namespace palmcore_emu {
// The dlopen handle of the module that holds the reference cuBLASLt (this extension itself), for
// csrc/cuda/cublaslt.cpp to look the functions up by name as it does in NVIDIA's library.
void* cublaslt_library();
}  // namespace palmcore_emu
