// The emulated CUDA runtime's host API (include/cuda_runtime.h): one sm_90 device whose memory
// is a tracked pool of host allocations, streams whose work runs when it is enqueued (so every
// stream is in order with itself and with the others), and graphs as recordings of the launches,
// copies and host work enqueued on a capturing stream, replayed in order.
//
// Faithful where palmcore's correctness depends on it:
//   - a kernel's pointer arguments must lie in live device allocations (a host pointer, or a
//     freed buffer, is cudaErrorIllegalAddress naming the kernel and the argument);
//   - fresh device memory holds 0xFF bytes (a NaN in every float type), never zeros;
//   - cudaMemGetInfo / cudaMalloc work against PALMCORE_EMULATE_MEMORY bytes (default 8 GiB,
//     read at each call), beyond which cudaMalloc says cudaErrorMemoryAllocation;
//   - launches beyond the device's limits fail as the driver's do;
//   - while a thread captures in the global or thread-local mode, the calls a capture forbids
//     (synchronous copies and sets, synchronisation, allocation and freeing) fail with
//     cudaErrorStreamCaptureUnsupported and invalidate the capture.
// Errors are kept per host thread for cudaGetLastError; cudaGetErrorString of the last error's
// code gives the emulator's detailed message (which kernel, which argument, which limit).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "executor.h"

struct CUgraph_st {
  std::vector<std::function<cudaError_t()>> nodes;
};
struct CUgraphExec_st {
  std::vector<std::function<cudaError_t()>> nodes;
};
// A stream's capture: what was enqueued on it since cudaStreamBeginCapture.
struct Capture {
  cudaStreamCaptureMode mode = cudaStreamCaptureModeGlobal;
  std::thread::id thread;
  bool invalidated = false;
  std::vector<std::function<cudaError_t()>> nodes;
};
struct CUstream_st {
  std::unique_ptr<Capture> capture;
};

namespace palmcore_emu {
namespace {

constexpr size_t kDefaultMemory = size_t{8} << 30;
constexpr size_t kAllocationAlignment = 256;  // cudaMalloc's
constexpr size_t kDefaultDynamicShared = 48 << 10;
constexpr size_t kOptinShared = 227 << 10;  // sm_90's opt-in maximum per block

// Everything the device holds; one lock, also held while a grid runs (the device runs one
// thing at a time; recursive: a graph's replay runs its launches under it).
struct Device {
  std::recursive_mutex mutex;
  std::map<uintptr_t, size_t> allocations;  // start -> bytes
  size_t used = 0;
  std::map<const void*, size_t> dynamic_shared_limit;  // cudaFuncSetAttribute
};
Device& device() {
  static Device* d = new Device;  // never destroyed: used until the process ends
  return *d;
}

thread_local cudaError_t last_error = cudaSuccess;
thread_local cudaError_t message_code = cudaSuccess;
thread_local std::string message;
thread_local std::vector<cudaStream_t> captures_of_this_thread;  // forbidding modes only

size_t memory_size() {
  const char* env = std::getenv("PALMCORE_EMULATE_MEMORY");
  if (!env || !*env) return kDefaultMemory;
  char* end = nullptr;
  const unsigned long long v = std::strtoull(env, &end, 10);
  if (*end != '\0' || v == 0) {
    std::fprintf(stderr, "palmcore emulator: PALMCORE_EMULATE_MEMORY=%s is not a byte count; using 8 GiB\n", env);
    return kDefaultMemory;
  }
  return static_cast<size_t>(v);
}

const char* standard_string(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInitializationError: return "initialization error";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevicePointer: return "invalid device pointer";
    case cudaErrorInvalidMemcpyDirection: return "invalid copy direction for memcpy";
    case cudaErrorInsufficientDriver: return "CUDA driver version is insufficient for CUDA runtime version";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorIllegalState: return "the operation cannot be performed in the present state";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing";
    case cudaErrorStreamCaptureInvalidated: return "operation failed due to a previous error during capture";
    case cudaErrorStreamCaptureWrongThread:
      return "attempt to terminate a thread-local capture sequence from another thread";
  }
  return "unrecognized error code";
}

cudaError_t fail(cudaError_t e, const std::string& detail) { return record_error(e, detail); }

// The live allocation holding p, or allocations.end().
std::map<uintptr_t, size_t>::const_iterator allocation_of(const void* p) {
  const Device& d = device();
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  auto it = d.allocations.upper_bound(a);
  if (it == d.allocations.begin()) return d.allocations.end();
  --it;
  return a <= it->first + it->second ? it : d.allocations.end();  // one past the end is a pointer too
}

std::string hex(const void* p) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%p", p);
  return buf;
}

// The call `what` is one a capture forbids: fails when this thread captures (and invalidates
// its captures), as the CUDA runtime does in the global and thread-local modes.
cudaError_t forbidden_in_capture(const char* what) {
  if (captures_of_this_thread.empty()) return cudaSuccess;
  for (cudaStream_t s : captures_of_this_thread) s->capture->invalidated = true;
  return fail(cudaErrorStreamCaptureUnsupported, std::string(what) + " while this thread captures a graph");
}

// Runs `work` on `stream` now, or records it while the stream captures.
cudaError_t on_stream(cudaStream_t stream, std::function<cudaError_t()> work) {
  std::lock_guard<std::recursive_mutex> lock(device().mutex);
  if (stream && stream->capture) {
    if (stream->capture->invalidated) return fail(cudaErrorStreamCaptureInvalidated, "the stream's capture failed");
    stream->capture->nodes.push_back(std::move(work));
    return cudaSuccess;
  }
  return work();
}

cudaError_t check_pointers(const LaunchConfig& config, const std::vector<std::pair<int, const void*>>& pointers) {
  for (const auto& [index, p] : pointers)
    if (p && allocation_of(p) == device().allocations.end())
      return fail(cudaErrorIllegalAddress, std::string("kernel ") + config.kernel + ": argument " +
                                               std::to_string(index) + " is " + hex(p) +
                                               ", not in any live device allocation (a host pointer, or freed memory)");
  return cudaSuccess;
}

cudaError_t check_config(const LaunchConfig& c) {
  const std::string kernel = std::string("kernel ") + c.kernel + ": ";
  const dim3 b = c.block, g = c.grid;
  const unsigned long long threads = 1ull * b.x * b.y * b.z;
  if (b.x == 0 || b.y == 0 || b.z == 0 || g.x == 0 || g.y == 0 || g.z == 0)
    return fail(cudaErrorInvalidConfiguration, kernel + "a grid or block dimension is 0");
  if (threads > 1024 || b.x > 1024 || b.y > 1024 || b.z > 64)
    return fail(cudaErrorInvalidConfiguration, kernel + "block (" + std::to_string(b.x) + ", " + std::to_string(b.y) +
                                                   ", " + std::to_string(b.z) +
                                                   ") is more than 1024 threads or (1024, 1024, 64)");
  if (g.x > 2147483647u || g.y > 65535 || g.z > 65535)
    return fail(cudaErrorInvalidConfiguration, kernel + "grid (" + std::to_string(g.x) + ", " + std::to_string(g.y) +
                                                   ", " + std::to_string(g.z) + ") beyond (2^31 - 1, 65535, 65535)");
  if (c.shared_bytes > kOptinShared)
    return fail(cudaErrorInvalidValue, kernel + std::to_string(c.shared_bytes) +
                                           " bytes of dynamic shared memory, above sm_90's 227 KiB");
  if (c.shared_bytes > kDefaultDynamicShared) {
    const auto& limits = device().dynamic_shared_limit;
    const auto it = c.address ? limits.find(c.address) : limits.end();
    if (it == limits.end() || it->second < c.shared_bytes)
      return fail(cudaErrorInvalidValue,
                  kernel + std::to_string(c.shared_bytes) +
                      " bytes of dynamic shared memory, above 48 KiB without cudaFuncSetAttribute("
                      "cudaFuncAttributeMaxDynamicSharedMemorySize) raising the kernel's limit that far");
  }
  return cudaSuccess;
}

cudaError_t execute(const LaunchConfig& config, const std::vector<std::pair<int, const void*>>& pointers,
                    const std::function<void()>& body) {
  std::lock_guard<std::recursive_mutex> lock(device().mutex);
  if (const cudaError_t e = check_pointers(config, pointers)) return e;  // (again at a graph's replay)
  try {
    run_grid(config, body);
  } catch (const std::exception& e) {
    return fail(cudaErrorLaunchFailure, std::string("kernel ") + config.kernel + ", " + e.what());
  }
  return cudaSuccess;
}

// [p, p + bytes) must lie in one device allocation (`side` names it in the message).
cudaError_t check_device_range(const void* p, size_t bytes, const char* what, const char* side) {
  if (bytes == 0 || is_device_range(p, bytes)) return cudaSuccess;
  return fail(cudaErrorInvalidValue, std::string(what) + ": the " + side + " [" + hex(p) + ", +" +
                                         std::to_string(bytes) + ") is not inside one device allocation");
}

// A range that starts in device memory must end there too (cudaMemcpyDefault's rule here).
cudaError_t check_if_device(const void* p, size_t bytes, const char* what, const char* side) {
  std::lock_guard<std::recursive_mutex> lock(device().mutex);
  if (bytes == 0 || allocation_of(p) == device().allocations.end()) return cudaSuccess;
  return check_device_range(p, bytes, what, side);
}

cudaError_t check_copy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, const char* what) {
  switch (kind) {
    case cudaMemcpyHostToHost: return cudaSuccess;
    case cudaMemcpyHostToDevice: return check_device_range(dst, bytes, what, "destination");
    case cudaMemcpyDeviceToHost: return check_device_range(src, bytes, what, "source");
    case cudaMemcpyDeviceToDevice:
      if (const cudaError_t e = check_device_range(src, bytes, what, "source")) return e;
      return check_device_range(dst, bytes, what, "destination");
    case cudaMemcpyDefault:
      if (const cudaError_t e = check_if_device(src, bytes, what, "source")) return e;
      return check_if_device(dst, bytes, what, "destination");
  }
  return fail(cudaErrorInvalidMemcpyDirection, what);
}

cudaError_t copy_node(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  if (const cudaError_t e = check_copy(dst, src, bytes, kind, "cudaMemcpyAsync")) return e;  // (again at a replay)
  if (bytes) std::memmove(dst, src, bytes);
  return cudaSuccess;
}

cudaError_t set_node(void* dst, int value, size_t bytes) {
  if (const cudaError_t e = check_device_range(dst, bytes, "cudaMemsetAsync", "destination")) return e;
  if (bytes) std::memset(dst, value, bytes);
  return cudaSuccess;
}

cudaError_t run_nodes(const std::vector<std::function<cudaError_t()>>& nodes) {
  for (const auto& node : nodes)
    if (const cudaError_t e = node()) return e;
  return cudaSuccess;
}

}  // namespace

cudaError_t record_error(cudaError_t error, const std::string& detail) {
  last_error = error;
  message_code = error;
  message = std::string(standard_string(error)) + (detail.empty() ? "" : " (emulated device: " + detail + ")");
  return error;
}

bool is_device_range(const void* p, size_t bytes) {
  std::lock_guard<std::recursive_mutex> lock(device().mutex);
  const auto it = allocation_of(p);
  return it != device().allocations.end() &&
         reinterpret_cast<uintptr_t>(p) + bytes <= it->first + it->second;
}

cudaError_t submit(const LaunchConfig& config, const std::vector<std::pair<int, const void*>>& pointers,
                   std::function<void()> body, cudaStream_t stream) {
  std::lock_guard<std::recursive_mutex> lock(device().mutex);
  if (const cudaError_t e = check_config(config)) return e;
  if (const cudaError_t e = check_pointers(config, pointers)) return e;
  return on_stream(stream, [config, pointers, body = std::move(body)] { return execute(config, pointers, body); });
}

cudaError_t enqueue_host_work(cudaStream_t stream, const char* what, std::function<cudaError_t()> work) {
  (void)what;
  return on_stream(stream, std::move(work));
}

}  // namespace palmcore_emu

using palmcore_emu::device;
using palmcore_emu::fail;

cudaError_t cudaGetLastError() {
  const cudaError_t e = palmcore_emu::last_error;
  palmcore_emu::last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return palmcore_emu::last_error; }

const char* cudaGetErrorString(cudaError_t error) {
  if (error == palmcore_emu::message_code && !palmcore_emu::message.empty()) return palmcore_emu::message.c_str();
  return palmcore_emu::standard_string(error);
}

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
#define PALMCORE_EMU_NAME(e) \
  case e: return #e;
    PALMCORE_EMU_NAME(cudaSuccess)
    PALMCORE_EMU_NAME(cudaErrorInvalidValue)
    PALMCORE_EMU_NAME(cudaErrorMemoryAllocation)
    PALMCORE_EMU_NAME(cudaErrorInitializationError)
    PALMCORE_EMU_NAME(cudaErrorInvalidConfiguration)
    PALMCORE_EMU_NAME(cudaErrorInvalidDevicePointer)
    PALMCORE_EMU_NAME(cudaErrorInvalidMemcpyDirection)
    PALMCORE_EMU_NAME(cudaErrorInsufficientDriver)
    PALMCORE_EMU_NAME(cudaErrorNoDevice)
    PALMCORE_EMU_NAME(cudaErrorInvalidDevice)
    PALMCORE_EMU_NAME(cudaErrorInvalidResourceHandle)
    PALMCORE_EMU_NAME(cudaErrorIllegalState)
    PALMCORE_EMU_NAME(cudaErrorIllegalAddress)
    PALMCORE_EMU_NAME(cudaErrorLaunchFailure)
    PALMCORE_EMU_NAME(cudaErrorStreamCaptureUnsupported)
    PALMCORE_EMU_NAME(cudaErrorStreamCaptureInvalidated)
    PALMCORE_EMU_NAME(cudaErrorStreamCaptureWrongThread)
#undef PALMCORE_EMU_NAME
  }
  return "cudaErrorUnknown";
}

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int d) {
  if (d != 0) return fail(cudaErrorInvalidDevice, "the emulator has one device, 0");
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}

cudaError_t cudaDriverGetVersion(int* version) {
  *version = CUDART_VERSION;
  return cudaSuccess;
}

cudaError_t cudaRuntimeGetVersion(int* version) {
  *version = CUDART_VERSION;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int d) {
  if (d != 0) return fail(cudaErrorInvalidDevice, "the emulator has one device, 0");
  *prop = cudaDeviceProp{};
  std::snprintf(prop->name, sizeof prop->name, "palmcore emulated CUDA device (sm_90 on the CPU)");
  prop->totalGlobalMem = palmcore_emu::memory_size();
  prop->sharedMemPerBlock = palmcore_emu::kDefaultDynamicShared;
  prop->sharedMemPerBlockOptin = palmcore_emu::kOptinShared;
  prop->regsPerBlock = 65536;
  prop->warpSize = palmcore_emu::kWarpSize;
  prop->maxThreadsPerBlock = 1024;
  prop->maxThreadsDim[0] = 1024;
  prop->maxThreadsDim[1] = 1024;
  prop->maxThreadsDim[2] = 64;
  prop->maxGridSize[0] = 2147483647;
  prop->maxGridSize[1] = 65535;
  prop->maxGridSize[2] = 65535;
  prop->major = 9;
  prop->minor = 0;
  prop->multiProcessorCount = 132;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int d) {
  cudaDeviceProp prop;
  if (const cudaError_t e = cudaGetDeviceProperties(&prop, d)) return e;
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = prop.maxThreadsPerBlock; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = static_cast<int>(prop.sharedMemPerBlock); return cudaSuccess;
    case cudaDevAttrWarpSize: *value = prop.warpSize; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = prop.multiProcessorCount; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = prop.major; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = prop.minor; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(prop.sharedMemPerBlockOptin); return cudaSuccess;
  }
  return fail(cudaErrorInvalidValue, "cudaDeviceGetAttribute: an attribute the emulator does not know");
}

cudaError_t cudaDeviceSynchronize() { return palmcore_emu::forbidden_in_capture("cudaDeviceSynchronize"); }

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize)
    return fail(cudaErrorInvalidValue, "cudaFuncSetAttribute: an attribute the emulator does not know");
  if (value < 0 || static_cast<size_t>(value) > palmcore_emu::kOptinShared)
    return fail(cudaErrorInvalidValue, "cudaFuncSetAttribute: " + std::to_string(value) +
                                           " bytes of dynamic shared memory, above sm_90's 227 KiB");
  std::lock_guard<std::recursive_mutex> lock(device().mutex);
  device().dynamic_shared_limit[func] = static_cast<size_t>(value);
  return cudaSuccess;
}

cudaError_t cudaMalloc(void** pointer, size_t bytes) {
  *pointer = nullptr;
  if (const cudaError_t e = palmcore_emu::forbidden_in_capture("cudaMalloc")) return e;
  if (bytes == 0) return cudaSuccess;
  auto& d = device();
  std::lock_guard<std::recursive_mutex> lock(d.mutex);
  const size_t total = palmcore_emu::memory_size();
  if (d.used + bytes > total || bytes > total)
    return fail(cudaErrorMemoryAllocation, "cudaMalloc of " + std::to_string(bytes) + " bytes with " +
                                               std::to_string(total - std::min(total, d.used)) + " of " +
                                               std::to_string(total) + " free (PALMCORE_EMULATE_MEMORY)");
  void* p = nullptr;
  if (posix_memalign(&p, palmcore_emu::kAllocationAlignment, bytes) != 0)
    return fail(cudaErrorMemoryAllocation, "the host has no " + std::to_string(bytes) + " bytes for the emulator");
  std::memset(p, 0xFF, bytes);  // never zeros: code that reads memory it did not write shows it
  d.allocations.emplace(reinterpret_cast<uintptr_t>(p), bytes);
  d.used += bytes;
  *pointer = p;
  return cudaSuccess;
}

cudaError_t cudaFree(void* pointer) {
  if (const cudaError_t e = palmcore_emu::forbidden_in_capture("cudaFree")) return e;
  if (!pointer) return cudaSuccess;
  auto& d = device();
  std::lock_guard<std::recursive_mutex> lock(d.mutex);
  const auto it = d.allocations.find(reinterpret_cast<uintptr_t>(pointer));
  if (it == d.allocations.end())
    return fail(cudaErrorInvalidValue, "cudaFree of " + palmcore_emu::hex(pointer) + ", not a live allocation's start");
  d.used -= it->second;
  d.allocations.erase(it);
  std::free(pointer);
  return cudaSuccess;
}

cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  auto& d = device();
  std::lock_guard<std::recursive_mutex> lock(d.mutex);
  const size_t total = palmcore_emu::memory_size();
  *total_bytes = total;
  *free_bytes = total - std::min(total, d.used);
  return cudaSuccess;
}

cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attributes, const void* pointer) {
  std::lock_guard<std::recursive_mutex> lock(device().mutex);
  const bool on_device = palmcore_emu::allocation_of(pointer) != device().allocations.end();
  attributes->type = on_device ? cudaMemoryTypeDevice : cudaMemoryTypeUnregistered;
  attributes->device = on_device ? 0 : -2;  // cudaInvalidDeviceId
  attributes->devicePointer = on_device ? const_cast<void*>(pointer) : nullptr;
  attributes->hostPointer = nullptr;
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  if (const cudaError_t e = palmcore_emu::forbidden_in_capture("cudaMemcpy")) return e;
  return palmcore_emu::on_stream(nullptr, [=] { return palmcore_emu::copy_node(dst, src, bytes, kind); });
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream) {
  if (const cudaError_t e = palmcore_emu::check_copy(dst, src, bytes, kind, "cudaMemcpyAsync")) return e;
  return palmcore_emu::on_stream(stream, [=] { return palmcore_emu::copy_node(dst, src, bytes, kind); });
}

cudaError_t cudaMemset(void* dst, int value, size_t bytes) {
  if (const cudaError_t e = palmcore_emu::forbidden_in_capture("cudaMemset")) return e;
  return palmcore_emu::on_stream(nullptr, [=] { return palmcore_emu::set_node(dst, value, bytes); });
}

cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t stream) {
  if (const cudaError_t e = palmcore_emu::check_device_range(dst, bytes, "cudaMemsetAsync", "destination")) return e;
  return palmcore_emu::on_stream(stream, [=] { return palmcore_emu::set_node(dst, value, bytes); });
}

cudaError_t cudaStreamCreate(cudaStream_t* stream) { return cudaStreamCreateWithFlags(stream, cudaStreamDefault); }

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned flags) {
  if (flags & ~cudaStreamNonBlocking) return fail(cudaErrorInvalidValue, "cudaStreamCreateWithFlags: unknown flags");
  *stream = new CUstream_st;
  return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  if (!stream) return fail(cudaErrorInvalidResourceHandle, "cudaStreamDestroy of the default stream");
  std::lock_guard<std::recursive_mutex> lock(device().mutex);
  auto& mine = palmcore_emu::captures_of_this_thread;
  mine.erase(std::remove(mine.begin(), mine.end(), stream), mine.end());
  delete stream;
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  if (stream && stream->capture) {
    stream->capture->invalidated = true;
    return fail(cudaErrorStreamCaptureUnsupported, "cudaStreamSynchronize of a capturing stream");
  }
  return palmcore_emu::forbidden_in_capture("cudaStreamSynchronize");
}

cudaError_t cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode mode) {
  if (!stream) return fail(cudaErrorStreamCaptureUnsupported, "capturing the legacy default stream");
  std::lock_guard<std::recursive_mutex> lock(device().mutex);
  if (stream->capture) return fail(cudaErrorIllegalState, "cudaStreamBeginCapture: the stream already captures");
  stream->capture = std::make_unique<Capture>();
  stream->capture->mode = mode;
  stream->capture->thread = std::this_thread::get_id();
  if (mode != cudaStreamCaptureModeRelaxed) palmcore_emu::captures_of_this_thread.push_back(stream);
  return cudaSuccess;
}

cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t* graph) {
  *graph = nullptr;
  std::lock_guard<std::recursive_mutex> lock(device().mutex);
  if (!stream || !stream->capture) return fail(cudaErrorIllegalState, "cudaStreamEndCapture: the stream does not capture");
  if (stream->capture->mode != cudaStreamCaptureModeRelaxed && stream->capture->thread != std::this_thread::get_id())
    return fail(cudaErrorStreamCaptureWrongThread, "cudaStreamEndCapture from another thread");
  auto& mine = palmcore_emu::captures_of_this_thread;
  mine.erase(std::remove(mine.begin(), mine.end(), stream), mine.end());
  std::unique_ptr<Capture> capture = std::move(stream->capture);
  if (capture->invalidated) return fail(cudaErrorStreamCaptureInvalidated, "the capture was invalidated");
  *graph = new CUgraph_st{std::move(capture->nodes)};
  return cudaSuccess;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus* status) {
  std::lock_guard<std::recursive_mutex> lock(device().mutex);
  *status = !stream || !stream->capture          ? cudaStreamCaptureStatusNone
            : stream->capture->invalidated ? cudaStreamCaptureStatusInvalidated
                                           : cudaStreamCaptureStatusActive;
  return cudaSuccess;
}

cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph, unsigned long long flags) {
  if (!graph) return fail(cudaErrorInvalidValue, "cudaGraphInstantiate of a null graph");
  if (flags) return fail(cudaErrorInvalidValue, "cudaGraphInstantiate: flags are not emulated");
  *exec = new CUgraphExec_st{graph->nodes};
  return cudaSuccess;
}

cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream) {
  if (!exec) return fail(cudaErrorInvalidValue, "cudaGraphLaunch of a null graph");
  return palmcore_emu::on_stream(stream, [exec] { return palmcore_emu::run_nodes(exec->nodes); });
}

cudaError_t cudaGraphDestroy(cudaGraph_t graph) {
  delete graph;
  return cudaSuccess;
}

cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
  delete exec;
  return cudaSuccess;
}
