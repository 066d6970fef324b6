// One context per device, made on first use (the first CUDA tensor): the stream every op of
// that device is enqueued on, the cuBLASLt handle and the workspace of its GEMMs. Contexts
// live until the process ends (never destroyed: the driver may be gone by static destruction).
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <mutex>

#include "cuda/cuda_ops.h"

namespace palmcore::cuda {

struct Context {
  int device = 0;
  cudaStream_t device_stream = nullptr;  // every op's, from every thread
  // The stream this thread enqueues on: the device's, or while this thread captures a graph
  // (cuda/graph.cpp) its private capture stream, so that no other thread's work lands in it.
  cudaStream_t stream() const;
  cublasLtHandle_t lt = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  // The ops' scratch (Scratch below): grown when an op needs more, never shrunk.
  std::mutex scratch_mutex;
  void* scratch = nullptr;
  size_t scratch_bytes = 0;
  int64_t scratch_generation = 0;  // counts the scratch's moves (a recorded graph holds its address)
};

// The current device's context, with that device made current on the calling thread (the
// CUDA runtime's current device is per thread; the callers of the ops are any threads).
// Throws std::runtime_error naming the reason when CUDA cannot be used.
Context& context();

// Device memory for an op's intermediate values (reduction partials), reused by every op of the
// current device in stream order instead of an allocation per call (cudaFree waits for the
// whole device). The lease holds the context's scratch until the op has enqueued its kernels,
// so the ops of two host threads never interleave on the same bytes; keep it no longer.
class Scratch {
 public:
  explicit Scratch(size_t bytes);
  template <class T>
  T* as() const {
    return static_cast<T*>(data_);
  }

 private:
  std::unique_lock<std::mutex> lock_;
  void* data_ = nullptr;
};

// Throws std::runtime_error "<what>: <CUDA's error string>" unless `status` is success.
void check_cuda(cudaError_t status, const char* what);

// f(float{}) or f(bf16{}): the element type of a float32 or bfloat16 tensor, for kernels written
// once over both storages (load_float / store_float of palmcore/math/bf16.h).
template <class F>
void with_float_storage(DType dtype, F&& f) {
  if (dtype == DType::BF16)
    f(bf16{});
  else
    f(float{});
}

}  // namespace palmcore::cuda
