// The CUDA runtime (linked statically) around the kernels: availability, device choice, the
// per-device contexts and device memory.
#include "cuda/context.h"

#include <dlfcn.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <memory>
#include <mutex>
#include <stdexcept>

#include "cuda/cublaslt.h"
#include "palmcore/memory.h"

namespace palmcore::cuda {
namespace {

constexpr size_t kWorkspaceBytes = size_t{32} << 20;  // cuBLASLt's recommendation for Hopper

std::atomic<int> selected_device{0};

std::string version_string(int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); }

// The driver and device part of unavailable_reason(); the answer does not change while the
// process runs, so it is worked out once.
const std::string& driver_problem() {
  static const std::string problem = []() -> std::string {
    int count = 0;
    const cudaError_t status = cudaGetDeviceCount(&count);
    cudaGetLastError();  // clear it
    if (status == cudaErrorInsufficientDriver || status == cudaErrorNoDevice || status == cudaSuccess) {
      if (status == cudaErrorInsufficientDriver) {
        void* driver = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
        if (!driver) return "no CUDA driver (libcuda.so.1 not found)";
        dlclose(driver);
        return "the CUDA driver supports CUDA " + version_string(driver_version()) +
               ", older than the CUDA runtime " + version_string(CUDART_VERSION) + " palmcore was built with";
      }
      if (status == cudaErrorNoDevice || count == 0) return "no CUDA device";
      return "";
    }
    return std::string("the CUDA runtime cannot start: ") + cudaGetErrorString(status);
  }();
  return problem;
}

}  // namespace

void check_cuda(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return;
  cudaGetLastError();  // a non-sticky error is cleared, so the next call is not blamed for it
  throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

std::string unavailable_reason() {
  if (!driver_problem().empty()) return driver_problem();
  std::string error;
  if (!cublaslt(&error)) return error;
  return "";
}

int driver_version() {
  int version = 0;
  if (cudaDriverGetVersion(&version) != cudaSuccess) cudaGetLastError();
  return version;
}

int built_runtime_version() { return CUDART_VERSION; }

static void require_available() {
  const std::string reason = unavailable_reason();
  if (!reason.empty()) throw std::runtime_error("CUDA is not usable: " + reason);
}

void set_device(int index) {
  require_available();
  int count = 0;
  check_cuda(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  if (index < 0 || index >= count)
    throw std::runtime_error("no CUDA device cuda:" + std::to_string(index) + " (this machine has " +
                             std::to_string(count) + ")");
  selected_device.store(index);
}

int current_device() { return selected_device.load(); }

Context& context() {
  constexpr int kMaxDevices = 64;
  static std::array<std::once_flag, kMaxDevices> once;
  static std::array<std::unique_ptr<Context>, kMaxDevices> contexts;
  thread_local int bound = -1;  // the device this thread last made current
  const int device = current_device();
  if (device >= kMaxDevices) throw std::runtime_error("palmcore handles CUDA devices 0.." + std::to_string(kMaxDevices - 1));
  std::call_once(once[device], [device] {
    require_available();
    check_cuda(cudaSetDevice(device), "cudaSetDevice");
    auto ctx = std::make_unique<Context>();
    ctx->device = device;
    check_cuda(cudaStreamCreateWithFlags(&ctx->device_stream, cudaStreamNonBlocking), "cudaStreamCreate");
    check_cublas(cublaslt()->create(&ctx->lt), "cublasLtCreate");
    check_cuda(cudaMalloc(&ctx->workspace, kWorkspaceBytes), "cudaMalloc (cuBLASLt workspace)");
    ctx->workspace_bytes = kWorkspaceBytes;
    count_device_allocation(device, kWorkspaceBytes);
    contexts[device] = std::move(ctx);
  });
  if (bound != device) {
    check_cuda(cudaSetDevice(device), "cudaSetDevice");
    bound = device;
  }
  return *contexts[device];
}

void* allocate(size_t bytes, const std::string& what) {
  const Context& ctx = context();
  if (bytes >= kCheckedAllocationBytes) {
    size_t free_bytes = 0, total_bytes = 0;
    check_cuda(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
    if (bytes > free_bytes)
      throw std::invalid_argument(device_out_of_memory_message(ctx.device, bytes, what, free_bytes));
  }
  void* data = nullptr;
  const cudaError_t status = cudaMalloc(&data, bytes);
  if (status == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    size_t free_bytes = 0, total_bytes = 0;
    cudaMemGetInfo(&free_bytes, &total_bytes);
    throw std::invalid_argument(device_out_of_memory_message(ctx.device, bytes, what, free_bytes));
  }
  check_cuda(status, "cudaMalloc");
  count_device_allocation(ctx.device, bytes);
  return data;
}

Scratch::Scratch(size_t bytes) {
  Context& ctx = context();
  lock_ = std::unique_lock<std::mutex>(ctx.scratch_mutex);
  if (bytes > ctx.scratch_bytes) {
    const size_t grown = std::max(bytes, 2 * ctx.scratch_bytes);
    void* bigger = allocate(grown, "scratch for reduction partials");
    release(ctx.scratch, ctx.scratch_bytes);  // (waits for the kernels still reading it)
    ctx.scratch = bigger;
    ctx.scratch_bytes = grown;
    ++ctx.scratch_generation;
  }
  data_ = ctx.scratch;
}

void release(void* data, size_t bytes) {
  if (!data) return;
  // The buffer's own device (the current one may have changed since it was made).
  cudaPointerAttributes attributes{};
  const int device = cudaPointerGetAttributes(&attributes, data) == cudaSuccess ? attributes.device : current_device();
  cudaFree(data);  // waits for the work queued on it; an error here (driver shutting down) is ignored
  cudaGetLastError();
  count_device_release(device, bytes);
}

std::vector<CudaDeviceInfo> devices() {
  std::vector<CudaDeviceInfo> list;
  if (!driver_problem().empty()) return list;
  int count = 0, previous = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || cudaGetDevice(&previous) != cudaSuccess) {
    cudaGetLastError();
    return list;
  }
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) continue;
    CudaDeviceInfo info;
    info.index = i;
    info.name = prop.name;
    info.major = prop.major;
    info.minor = prop.minor;
    info.multiprocessors = prop.multiProcessorCount;
    info.total_bytes = prop.totalGlobalMem;
    size_t free_bytes = 0, total_bytes = 0;  // needs the device's primary context
    if (cudaSetDevice(i) == cudaSuccess && cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess)
      info.free_bytes = free_bytes;
    list.push_back(info);
  }
  cudaGetLastError();
  cudaSetDevice(previous);
  return list;
}

}  // namespace palmcore::cuda
