// A sequence of ops run again and again on the same tensors: on CUDA, captured once into a
// CUDA graph and replayed as one launch; on the CPU, simply run. The ops must touch the same
// tensors (addresses) on every run and must neither allocate, copy to or from the host, nor
// wait; what changes between runs (ids, positions) is copied into those tensors before run().
// The owner calls reset() when the tensors change (a new shape, another cache).
#pragma once

#include <cstdint>
#include <functional>
#include <utility>

#include "palmcore/ops.h"

namespace palmcore {

// Process-wide switch for CUDA graphs (on by default; PALMCORE_CUDA_GRAPHS=0 turns them off at
// start-up): off, every run is eager, the yardstick a replay must equal.
void set_cuda_graphs(bool on);
bool cuda_graphs();

class Recording {
 public:
  Recording() = default;
  ~Recording() { reset(); }
  Recording(const Recording&) = delete;
  Recording& operator=(const Recording&) = delete;
  Recording(Recording&& other) noexcept { *this = std::move(other); }
  Recording& operator=(Recording&& other) noexcept {
    if (this != &other) {
      reset();
      std::swap(eager_runs_, other.eager_runs_);
      std::swap(capture_failed_, other.capture_failed_);
      std::swap(graph_, other.graph_);
    }
    return *this;
  }

  // Runs `ops` on `device`. CUDA with graphs on: the first run is eager (it sizes the scratch
  // and the GEMM algorithm cache), the second is captured, later ones replay the graph. A
  // capture that fails is said once on stderr, and the runs stay eager until reset().
  void run(Device device, const std::function<void()>& ops);
  void reset();
  bool recorded() const { return static_cast<bool>(graph_); }

 private:
  int eager_runs_ = 0;
  bool capture_failed_ = false;
  DeviceGraph graph_;
};

}  // namespace palmcore
