// The ops the PaLM graph is written in: one declaration per op, forward and backward together
// (palmcore/op_signatures.inc). Each op knows nothing of Python and dispatches once on its
// tensors' device (ops.cpp) to the backend's kernel of the same name (cpu/*.cpp; a CUDA
// backend adds cuda/*.cu).
//
// Conventions: activations are 2-D [rows, width] with rows = batch · seq in row-major order
// (row = b·T + t); "accumulated" outputs are added to, never overwritten.
#pragma once

#include <functional>
#include <utility>

#include "palmcore/sampler.h"
#include "palmcore/tensor.h"

namespace palmcore {

struct AttentionShape {
  int64_t batch, seq, heads, kv_heads, head_dim;
  int64_t first_head = 0;  // of this shard's query heads among all of them
  int64_t group = 0;       // query heads per key/value head; 0: heads / kv_heads (unsharded)
  bool bf16 = false;       // round the probabilities and score gradients to bf16 (PALM_SPEC "Precision")
  int64_t query_group() const { return group ? group : heads / kv_heads; }
};
// Attention works a block of this many queries at a time.
constexpr int64_t kAttentionQueryBlock = 64;
// Attention's scratch, sized once per batch shape; what it holds is the backend's business
// (the CPU's per-thread score tiles follow the thread count by themselves).
struct AttentionWorkspace {
  // [workers, 2, max(kAttentionQueryBlock, H / Hkv), T]: score tiles per worker (CPU thread)
  Tensor tiles;
  // [B·H, T, dh]: key/value gradients per query head (only when made for the backward pass)
  Tensor dkeys_part, dvalues_part;
  // [B·H·T] float32: CUDA's flash backward keeps D_i = dout_i · out_i here (backward, CUDA only)
  Tensor row_dot;
  static AttentionWorkspace create(const AttentionShape& shape, Device device, bool for_backward);
};

// Which kernel runs where a backend has a fast one and a plain, obviously correct one beside it
// (CUDA attention): Fast by default, Plain to tell a wrong algorithm from a wrong optimisation.
// Process-wide; the environment variable PALMCORE_KERNELS=plain sets it at start-up.
enum class KernelChoice { Fast, Plain };
void set_kernel_choice(KernelChoice choice);
KernelChoice kernel_choice();

// Device graphs, behind palmcore/recording.h: the ops `ops` enqueues on `device`, captured once
// and replayed as one launch. Only CUDA has them (device_graphs(device) says); capture_graph
// throws when the capture fails (an op throws, or does what a capture forbids) or the device has
// none. launch_graph returns false, running nothing, when the graph no longer fits (the current
// device or the scratch it saw has changed). An empty DeviceGraph (no capture) is never launched.
struct DeviceGraph {
  void* handle = nullptr;  // the backend's graph (cuda::CapturedGraph)
  explicit operator bool() const { return handle != nullptr; }
};
bool device_graphs(Device device);
DeviceGraph capture_graph(Device device, const std::function<void()>& ops);
bool launch_graph(const DeviceGraph& graph);
void destroy_graph(DeviceGraph& graph);

// Optimizer settings (the update rules are in op_signatures.inc).
struct AdafactorSettings {
  double beta1 = 0.9, decay = 0.8, clip = 1.0, eps = 1e-30, min_scale = 1e-3;
};
struct AdamWSettings {
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.0;
};

#include "palmcore/op_signatures.inc"

}  // namespace palmcore
