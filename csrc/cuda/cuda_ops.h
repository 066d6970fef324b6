// The CUDA backend's kernels: the signatures of palmcore/op_signatures.inc (which give the
// math), one op family per file as in cpu/. Every op is enqueued on the current device's
// stream (cuda/context.h); only a copy to the host waits for it. Every op has a kernel: the
// plain, obviously correct ones of issue 11, which the fast ones will sit beside.
//
// This header names no CUDA type, so host-compiled files (tensor.cpp, ops.cpp) include it.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "palmcore/build_info.h"
#include "palmcore/ops.h"

namespace palmcore::cuda {

#include "palmcore/op_signatures.inc"

// The runtime around the kernels (cuda/context.cpp).

// Why CUDA cannot be used ("" when it can): no driver, a driver older than the runtime, no
// device, cuBLASLt not found. Never throws.
std::string unavailable_reason();
// The device of later CUDA tensors and ops (process-wide, 0 by default); throws
// std::runtime_error naming the reason when it cannot be used.
void set_device(int index);
int current_device();
// Device memory on the current device, counted by the memory guard (palmcore/memory.h):
// refused with std::invalid_argument naming `what` when it exceeds the device's free memory;
// std::runtime_error when CUDA cannot be used at all (the first CUDA tensor says why).
void* allocate(size_t bytes, const std::string& what);
void release(void* data, size_t bytes);
// CUDA graphs (cuda/graph.cpp), behind palmcore/recording.h: the ops `ops` enqueues on the
// current device are captured into an executable graph (an opaque handle, with its device and
// the scratch generation it saw); a capture that fails (an op throws, or does something a
// capture forbids) throws after ending the capture. launch_graph enqueues it on the device's
// stream, or returns false (nothing enqueued) when the current device or the scratch is no
// longer the graph's.
struct CapturedGraph {
  void* exec = nullptr;
  int device = 0;
  int64_t scratch_generation = 0;
};
CapturedGraph capture_graph(const std::function<void()>& ops);
bool launch_graph(const CapturedGraph& graph);
void destroy_graph(CapturedGraph& graph);

// For `palmcore info`; never throw.
std::vector<CudaDeviceInfo> devices();
int driver_version();
int built_runtime_version();

}  // namespace palmcore::cuda
