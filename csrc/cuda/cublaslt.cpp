#include "cuda/cublaslt.h"

#include <dlfcn.h>

#include <stdexcept>

namespace palmcore::cuda {

const CublasLt* cublaslt(std::string* error) {
  static std::string load_error;
  static const CublasLt* const api = []() -> const CublasLt* {
    // The soname of the major version palmcore was built against first, then whatever
    // libcublasLt.so the loader finds (checked to be that major version).
    const std::string versioned = "libcublasLt.so." + std::to_string(CUBLAS_VER_MAJOR);
#ifdef PALMCORE_CUDA_EMULATED
    // The emulated device's reference cuBLASLt (csrc/cuda_emulator/cublaslt.cpp), in this module.
    void* lib = palmcore_emu::cublaslt_library();
#else
    void* lib = dlopen(versioned.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!lib) lib = dlopen("libcublasLt.so", RTLD_NOW | RTLD_LOCAL);
#endif
    if (!lib) {
      load_error = "cuBLASLt not found (" + versioned +
                   " is not on the library path: install the CUDA toolkit or nvidia-cublas-cu" +
                   std::to_string(CUBLAS_VER_MAJOR) + " and add its lib folder to LD_LIBRARY_PATH)";
      return nullptr;
    }
    static CublasLt table;
    bool complete = true;
    auto get = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, name));
      if (!fn && complete) {
        load_error = std::string("cuBLASLt lacks ") + name;
        complete = false;
      }
    };
    get(table.create, "cublasLtCreate");
    get(table.get_version, "cublasLtGetVersion");
    get(table.status_string, "cublasLtGetStatusString");
    get(table.matmul, "cublasLtMatmul");
    get(table.desc_create, "cublasLtMatmulDescCreate");
    get(table.desc_destroy, "cublasLtMatmulDescDestroy");
    get(table.desc_set, "cublasLtMatmulDescSetAttribute");
    get(table.layout_create, "cublasLtMatrixLayoutCreate");
    get(table.layout_destroy, "cublasLtMatrixLayoutDestroy");
    get(table.preference_create, "cublasLtMatmulPreferenceCreate");
    get(table.preference_destroy, "cublasLtMatmulPreferenceDestroy");
    get(table.preference_set, "cublasLtMatmulPreferenceSetAttribute");
    get(table.heuristic, "cublasLtMatmulAlgoGetHeuristic");
    if (!complete) return nullptr;
    const size_t version = table.get_version();  // major · 10000 + minor · 100 + patch
    if (version / 10000 != CUBLAS_VER_MAJOR) {
      load_error = "cuBLASLt " + std::to_string(version) + " found, palmcore needs major version " +
                   std::to_string(CUBLAS_VER_MAJOR);
      return nullptr;
    }
    return &table;
  }();
  if (!api && error) *error = load_error;
  return api;
}

void check_cublas(cublasStatus_t status, const char* what) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  const CublasLt* api = cublaslt();
  throw std::runtime_error(std::string(what) + ": " +
                           (api ? api->status_string(status) : "cuBLASLt error " + std::to_string(status)));
}

}  // namespace palmcore::cuda
