// palmcore/recording.h over the CUDA backend's graphs (cuda/graph.cpp).
#include "palmcore/recording.h"

#include <atomic>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>

#ifdef PALMCORE_CUDA
#include "cuda/cuda_ops.h"
#endif

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
#ifdef PALMCORE_CUDA
  if (device == Device::CUDA && cuda_graphs()) {
    if (graph_) {
      if (cuda::launch_graph(*static_cast<cuda::CapturedGraph*>(graph_))) return;
      reset();  // its scratch moved, or the device changed: recorded again
    }
    if (eager_runs_ >= 1 && !capture_failed_) {
      try {
        graph_ = std::make_unique<cuda::CapturedGraph>(cuda::capture_graph(ops)).release();
        if (cuda::launch_graph(*static_cast<cuda::CapturedGraph*>(graph_))) return;
      } catch (const std::exception& e) {  // runs eagerly from now on, and says why once
        capture_failed_ = true;
        std::fprintf(stderr, "palmcore: a CUDA graph could not be captured (%s); running eagerly\n", e.what());
      }
    }
    ++eager_runs_;
    return ops();
  }
#endif
  (void)device;
  ops();
}

void Recording::reset() {
#ifdef PALMCORE_CUDA
  if (graph_) {
    auto* graph = static_cast<cuda::CapturedGraph*>(graph_);
    cuda::destroy_graph(*graph);
    delete graph;
  }
#endif
  graph_ = nullptr;
  eager_runs_ = 0;
  capture_failed_ = false;
}

}  // namespace palmcore
