// What was compiled in: the macros of this file's own compilation (it is built with the
// runtime's flags, -march=native included) and the definitions CMakeLists.txt gives it.
#include "palmcore/build_info.h"

#include <stdexcept>

#include "cblas.h"
#ifdef PALMCORE_CUDA
#include "cuda/cuda_ops.h"
#endif

#ifndef PALMCORE_BLAS_VERSION
#define PALMCORE_BLAS_VERSION ""
#endif
#ifndef PALMCORE_CUDA_OPTION
#define PALMCORE_CUDA_OPTION "?"
#endif

namespace palmcore {
namespace {

std::vector<int> parse_architectures(const std::string& list) {
  std::vector<int> archs;
  size_t begin = 0;
  while (begin < list.size()) {
    size_t end = list.find(',', begin);
    if (end == std::string::npos) end = list.size();
    archs.push_back(std::stoi(list.substr(begin, end - begin)));  // "90-real" -> 90
    begin = end + 1;
  }
  return archs;
}

}  // namespace

BuildInfo build_info() {
  BuildInfo info;
#if defined(__clang__)
  info.compiler = "clang " __clang_version__;
#elif defined(__GNUC__)
  info.compiler = "gcc " __VERSION__;
#endif
  const std::pair<bool, const char*> features[] = {
#ifdef __SSE4_2__
      {true, "SSE4.2"},
#endif
#ifdef __AVX__
      {true, "AVX"},
#endif
#ifdef __AVX2__
      {true, "AVX2"},
#endif
#ifdef __FMA__
      {true, "FMA"},
#endif
#ifdef __F16C__
      {true, "F16C"},
#endif
#ifdef __AVX512F__
      {true, "AVX512F"},
#endif
#ifdef __AVX512BW__
      {true, "AVX512BW"},
#endif
#ifdef __AVX512VL__
      {true, "AVX512VL"},
#endif
#ifdef __AVX512VNNI__
      {true, "AVX512VNNI"},
#endif
#ifdef __AVX512BF16__
      {true, "AVX512BF16"},
#endif
#ifdef __AMX_TILE__
      {true, "AMX"},
#endif
#ifdef __ARM_NEON
      {true, "NEON"},
#endif
#ifdef __ARM_FEATURE_SVE
      {true, "SVE"},
#endif
      {false, ""}};
  for (const auto& [on, name] : features)
    if (on) info.cpu_features.push_back(name);
  const std::string blas_version = PALMCORE_BLAS_VERSION;
  info.blas = "scipy-openblas32" + (blas_version.empty() ? std::string() : " " + blas_version);
  if (const char* config = scipy_openblas_get_config()) info.blas_config = config;
#ifdef PALMCORE_MPI
  info.mpi = true;
#endif
  info.cuda_option = PALMCORE_CUDA_OPTION;
#ifdef PALMCORE_CUDA
  info.cuda = true;
  info.cuda_version = PALMCORE_NVCC_VERSION;
  info.cuda_runtime_version = cuda::built_runtime_version();
  info.cuda_architectures = parse_architectures(PALMCORE_CUDA_ARCHS);
  info.cuda_architectures_default = std::string(PALMCORE_CUDA_ARCHS_SOURCE) == "default";
  info.nccl = true;
#endif
#ifdef PALMCORE_CUDA_EMULATED
  info.cuda_emulated = true;
#endif
  return info;
}

#ifdef PALMCORE_CUDA
std::vector<CudaDeviceInfo> cuda_devices() { return cuda::devices(); }
int cuda_driver_version() { return cuda::driver_version(); }
std::string cuda_unavailable_reason() { return cuda::unavailable_reason(); }
void use_cuda_device(int index) { cuda::set_device(index); }
#else
static const char* const kNoCuda =
    "palmcore was built without CUDA (PALMCORE_CUDA=OFF, or no nvcc found when it was built)";
std::vector<CudaDeviceInfo> cuda_devices() { return {}; }
int cuda_driver_version() { return 0; }
std::string cuda_unavailable_reason() { return kNoCuda; }
void use_cuda_device(int) { throw std::runtime_error(kNoCuda); }
#endif

}  // namespace palmcore
