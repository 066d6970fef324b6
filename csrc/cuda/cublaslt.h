// cuBLASLt, opened at run time (dlopen) so that the extension imports where it is absent:
// the functions palmcore calls, looked up once.
#pragma once

#include <cublasLt.h>

#include <string>

namespace palmcore::cuda {

struct CublasLt {
  decltype(&cublasLtCreate) create;
  decltype(&cublasLtGetVersion) get_version;
  decltype(&cublasLtGetStatusString) status_string;
  decltype(&cublasLtMatmul) matmul;
  decltype(&cublasLtMatmulDescCreate) desc_create;
  decltype(&cublasLtMatmulDescDestroy) desc_destroy;
  decltype(&cublasLtMatmulDescSetAttribute) desc_set;
  decltype(&cublasLtMatrixLayoutCreate) layout_create;
  decltype(&cublasLtMatrixLayoutDestroy) layout_destroy;
  decltype(&cublasLtMatmulPreferenceCreate) preference_create;
  decltype(&cublasLtMatmulPreferenceDestroy) preference_destroy;
  decltype(&cublasLtMatmulPreferenceSetAttribute) preference_set;
  decltype(&cublasLtMatmulAlgoGetHeuristic) heuristic;
};

// The library, loaded on first call; nullptr when it cannot be, with `error` saying why.
const CublasLt* cublaslt(std::string* error = nullptr);
// Throws std::runtime_error "<what>: <cuBLASLt's status string>" unless `status` is success.
void check_cublas(cublasStatus_t status, const char* what);

}  // namespace palmcore::cuda
