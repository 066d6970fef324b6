// palmcore/recording.h over the op layer's device graphs (palmcore/ops.h).
#include "palmcore/recording.h"

#include <atomic>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <exception>

#include "palmcore/ops.h"

namespace palmcore {

namespace {
std::atomic<bool>& graphs_setting() {
  static std::atomic<bool> on{[] {
    const char* env = std::getenv("PALMCORE_CUDA_GRAPHS");
    return !(env && std::strcmp(env, "0") == 0);
  }()};
  return on;
}
}  // namespace

void set_cuda_graphs(bool on) { graphs_setting() = on; }
bool cuda_graphs() { return graphs_setting(); }

void Recording::run(Device device, const std::function<void()>& ops) {
  if (!device_graphs(device) || !cuda_graphs()) return ops();
  if (graph_) {
    if (launch_graph(graph_)) return;
    reset();  // its scratch moved, or the device changed: recorded again
  }
  if (eager_runs_ >= 1 && !capture_failed_) {
    try {
      graph_ = capture_graph(device, ops);
      if (launch_graph(graph_)) return;
    } catch (const std::exception& e) {  // runs eagerly from now on, and says why once
      capture_failed_ = true;
      std::fprintf(stderr, "palmcore: a CUDA graph could not be captured (%s); running eagerly\n", e.what());
    }
  }
  ++eager_runs_;
  ops();
}

void Recording::reset() {
  destroy_graph(graph_);
  eager_runs_ = 0;
  capture_failed_ = false;
}

}  // namespace palmcore
