// CUDA graphs for palmcore/recording.h: a decode step's few hundred small launches captured
// once and replayed as one (launch overhead dominates a batch-1 step otherwise).
#include <stdexcept>

#include "cuda/context.h"

namespace palmcore::cuda {

CapturedGraph capture_graph(const std::function<void()>& ops) {
  Context& ctx = context();
  CapturedGraph captured{nullptr, ctx.device, 0};
  {  // the scratch the ops use must not move while the graph lives (Recording checks the generation)
    std::lock_guard<std::mutex> lock(ctx.scratch_mutex);
    captured.scratch_generation = ctx.scratch_generation;
  }
  // Thread-local mode: other host threads may keep using CUDA; this thread may not call
  // anything that a capture forbids (a synchronous copy, an allocation) until it ends.
  check_cuda(cudaStreamBeginCapture(ctx.stream, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
  cudaGraph_t graph = nullptr;
  try {
    ops();
  } catch (...) {
    cudaStreamEndCapture(ctx.stream, &graph);
    if (graph) cudaGraphDestroy(graph);
    cudaGetLastError();
    throw;
  }
  check_cuda(cudaStreamEndCapture(ctx.stream, &graph), "cudaStreamEndCapture");
  cudaGraphExec_t exec = nullptr;
  const cudaError_t status = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  check_cuda(status, "cudaGraphInstantiate");
  captured.exec = exec;
  return captured;
}

void launch_graph(const CapturedGraph& graph) {
  check_cuda(cudaGraphLaunch(static_cast<cudaGraphExec_t>(graph.exec), context().stream), "cudaGraphLaunch");
}

void destroy_graph(CapturedGraph& graph) {
  if (graph.exec) cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(graph.exec));
  cudaGetLastError();
  graph.exec = nullptr;
}

int64_t scratch_generation() {
  Context& ctx = context();
  std::lock_guard<std::mutex> lock(ctx.scratch_mutex);
  return ctx.scratch_generation;
}

}  // namespace palmcore::cuda
