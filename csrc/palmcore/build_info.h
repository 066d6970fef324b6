// What this build of palmcore holds (CPU features, BLAS, MPI, CUDA) and which CUDA devices the
// process can see: for `palmcore info`, palmcore.cuda_available() and the device argument of
// a model. Callable in every build; without the CUDA backend the CUDA answers say so.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace palmcore {

struct BuildInfo {
  std::string compiler;                 // the host C++ compiler and its version
  std::vector<std::string> cpu_features;  // from the compiler's macros (AVX2, AVX512F, ...)
  std::string blas;                     // "scipy-openblas32 0.3.x" (the build's wheel)
  std::string blas_config;              // what the loaded OpenBLAS says of itself
  bool mpi = false;                     // MPI collectives compiled in (PALMCORE_MPI)
  std::string cuda_option;              // PALMCORE_CUDA at configure time: AUTO, ON, OFF or EMULATE
  bool cuda = false;                    // the CUDA backend compiled in
  bool cuda_emulated = false;           // ... for the emulated device on the CPU (PALMCORE_CUDA=EMULATE)
  std::string cuda_version;             // nvcc's version, "13.0.88"
  int cuda_runtime_version = 0;         // CUDART_VERSION, 13000 for 13.0
  std::vector<int> cuda_architectures;  // "80;90" -> {80, 90}
  bool cuda_architectures_default = false;  // not overridden by CMAKE_CUDA_ARCHITECTURES
  bool nccl = false;                    // NCCL communicators compiled in (with CUDA; libnccl opened at run time)
};
BuildInfo build_info();

struct CudaDeviceInfo {
  int index = 0;
  std::string name;
  int major = 0, minor = 0;  // compute capability
  int multiprocessors = 0;
  uint64_t total_bytes = 0, free_bytes = 0;
};
// The devices the driver shows (empty without the backend, a driver or a device). Never throws.
std::vector<CudaDeviceInfo> cuda_devices();
// The installed driver's CUDA version (12080 for 12.8), 0 without one. Never throws.
int cuda_driver_version();
// Why CUDA cannot be used in this process, "" when it can: built without it, no driver, a
// driver too old, no device, cuBLASLt not found. Never throws.
std::string cuda_unavailable_reason();
// Makes device `index` the one later CUDA tensors and ops of this process use; throws
// std::runtime_error naming the reason when it cannot be used.
void use_cuda_device(int index);

}  // namespace palmcore
