// CUDA graphs for palmcore/recording.h: a decode step's few hundred small launches captured
// once and replayed as one (launch overhead dominates a batch-1 step otherwise).
//
// The capture runs on a private stream of the capturing thread (Context::stream() returns it
// to this thread's ops meanwhile), so that no other thread's work on the device's stream ends
// up recorded; the graph is then launched on the device's stream, in order with everything
// else. A replay holds the scratch lease (cuda::Scratch) while it is enqueued, as any op does.
#include <stdexcept>

#include "cuda/context.h"

namespace palmcore::cuda {
namespace {

// This thread's capture: the device it captures for (-1: none) and its private stream.
struct Capture {
  int device = -1;
  cudaStream_t stream = nullptr;
};
thread_local Capture capture;

}  // namespace

cudaStream_t Context::stream() const { return capture.device == device ? capture.stream : device_stream; }

CapturedGraph capture_graph(const std::function<void()>& ops) {
  Context& ctx = context();
  CapturedGraph captured{nullptr, ctx.device, 0};
  {  // the scratch the ops use must not move while the graph lives (launch_graph checks)
    std::lock_guard<std::mutex> lock(ctx.scratch_mutex);
    captured.scratch_generation = ctx.scratch_generation;
  }
  cudaStream_t stream = nullptr;
  check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate (capture)");
  // Thread-local mode: this thread may not call anything a capture forbids (a synchronous copy,
  // an allocation) until it ends; other threads are not affected.
  const cudaError_t begun = cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal);
  if (begun != cudaSuccess) cudaStreamDestroy(stream);
  check_cuda(begun, "cudaStreamBeginCapture");
  capture = {ctx.device, stream};
  cudaGraph_t graph = nullptr;
  try {
    ops();
  } catch (...) {
    capture = {};
    cudaStreamEndCapture(stream, &graph);
    if (graph) cudaGraphDestroy(graph);
    cudaStreamDestroy(stream);
    cudaGetLastError();
    throw;
  }
  capture = {};
  const cudaError_t ended = cudaStreamEndCapture(stream, &graph);
  cudaStreamDestroy(stream);
  check_cuda(ended, "cudaStreamEndCapture");
  cudaGraphExec_t exec = nullptr;
  const cudaError_t status = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  check_cuda(status, "cudaGraphInstantiate");
  captured.exec = exec;
  return captured;
}

bool launch_graph(const CapturedGraph& graph) {
  Context& ctx = context();
  if (ctx.device != graph.device) return false;  // made for another device
  std::lock_guard<std::mutex> lock(ctx.scratch_mutex);
  if (ctx.scratch_generation != graph.scratch_generation) return false;  // its scratch has moved
  check_cuda(cudaGraphLaunch(static_cast<cudaGraphExec_t>(graph.exec), ctx.device_stream), "cudaGraphLaunch");
  return true;
}

void destroy_graph(CapturedGraph& graph) {
  if (graph.exec) cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(graph.exec));
  cudaGetLastError();
  graph.exec = nullptr;
}

}  // namespace palmcore::cuda
