// Checks of the emulated CUDA device (csrc/cuda_emulator), written as CUDA: rewrite.py turns this
// file into C++ as it does csrc/cuda/*.cu, and the host compiler builds it with the emulator
// (run_checks.sh; tests/test_cuda_emulator.py runs that). Every check can fail: each one asserts
// both that correct code gives the right answer and that the broken variant is caught.
//
//   checks            run them all: one line per check, exit status 1 if any failed
//   checks NAME...    run those
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

constexpr int kThreads = 128;

// ---- kernels ---------------------------------------------------------------------------------

// out[blockIdx.x] = Σ x over the block's kThreads elements, by a tree in shared memory; with
// `barriers` false the tree runs without its __syncthreads (a race).
__global__ void tree_sum(const float* x, float* out, bool barriers) {
  __shared__ float s[kThreads];
  const int t = threadIdx.x;
  s[t] = x[blockIdx.x * kThreads + t];
  if (barriers) __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (t < half) s[t] += s[t + half];
    if (barriers) __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

// Threads past `live` leave before the barrier the others wait at.
__global__ void early_exit(float* out, int live) {
  if (static_cast<int>(threadIdx.x) >= live) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// Even and odd threads wait at two different barriers.
__global__ void two_barriers(float* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

// out[t] = the value thread t + 1 wrote, read without (or with) a barrier between.
__global__ void neighbour(int* out, bool barrier) {
  __shared__ int s[kThreads];
  const int t = threadIdx.x;
  s[t] = t * 10;
  if (barrier) __syncthreads();
  out[t] = s[(t + 1) % kThreads];
}

__global__ void fill_kernel(float* out, float value, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = value;
}

// Dynamic shared memory of `bytes`, one float written and read back.
__global__ void uses_dynamic_shared(float* out) {
  extern __shared__ float dyn[];
  dyn[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = dyn[(threadIdx.x + 1) % blockDim.x];
}

// out[t] = the unwritten shared value thread t reads (NaN fill) and, in out[blockDim.x + t], a
// dynamic one.
__global__ void read_unwritten(float* out) {
  __shared__ float s[kThreads];
  extern __shared__ float dyn[];
  out[threadIdx.x] = s[threadIdx.x];
  out[blockDim.x + threadIdx.x] = dyn[threadIdx.x];
}

// Butterfly sum over the 32 lanes: out[lane] = Σ lanes.
__global__ void warp_sum(float* out) {
  float v = static_cast<float>(threadIdx.x % 32 + 1);
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  out[threadIdx.x] = v;
}

// Lanes 0..15 sum among themselves (mask 0x0000ffff); lanes 16..31 take a ballot of their own
// (mask 0xffff0000) of odd lanes; then shuffles with width 8.
__global__ void warp_partial(unsigned* out) {
  const int lane = threadIdx.x % 32;
  if (lane < 16) {
    unsigned v = lane;
    for (int offset = 8; offset > 0; offset /= 2) v += __shfl_xor_sync(0x0000ffffu, v, offset);
    out[lane] = v;  // 0 + 1 + ... + 15 = 120
  } else {
    out[lane] = __ballot_sync(0xffff0000u, lane % 2 == 1);
  }
  __syncwarp();
  out[32 + lane] = __shfl_down_sync(0xffffffffu, static_cast<unsigned>(lane), 1, 8);  // lane + 1, own at a segment end
  out[64 + lane] = __shfl_up_sync(0xffffffffu, static_cast<unsigned>(lane), 2, 8);    // lane - 2, own at a segment start
  out[96 + lane] = __shfl_sync(0xffffffffu, static_cast<unsigned>(lane), 3, 8);      // lane 3 of the segment
  out[128 + lane] = __any_sync(0xffffffffu, lane == 7) + 2 * __all_sync(0xffffffffu, lane < 32);
}

// Lane 5 leaves; the others then shuffle with a mask that names it.
__global__ void warp_lane_exits(float* out) {
  if (threadIdx.x % 32 == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// Each lane of the lower half reads lane + 16, which its mask leaves out.
__global__ void warp_reads_outside(float* out) {
  const int lane = threadIdx.x % 32;
  if (lane < 16)
    out[lane] = __shfl_down_sync(0x0000ffffu, 1.0f, 16);
  else
    out[lane] = 0.0f;
}

// The block's _or, _and, _count of (t < n) into out[0..2].
__global__ void barrier_reductions(int* out, int n) {
  const int p = static_cast<int>(threadIdx.x) < n;
  const int any = __syncthreads_or(p), all = __syncthreads_and(p), count = __syncthreads_count(p);
  if (threadIdx.x == 0) {
    out[0] = any;
    out[1] = all;
    out[2] = count;
  }
}

__global__ void traps(float* out) {
  if (threadIdx.x == 3) __trap();
  out[threadIdx.x] = 0.0f;
}

// Template kernels: out[i] = x[i] · k (k deduced from the arguments' types, or explicit).
template <class T>
__global__ void scale_by(const T* x, T* out, T k, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = x[i] * k;
}

template <int kBy>
__global__ void add_const(int* x, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] += kBy;
}

// Writes one element past the end of an n-element buffer (thread n - 1 of the block).
__global__ void write_past_end(float* out, int n) {
  if (static_cast<int>(threadIdx.x) == n - 1) out[threadIdx.x + 1] = 1.0f;
}

// ---- host helpers ----------------------------------------------------------------------------

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

void expect(bool ok, const std::string& what) {
  if (!ok) throw Failure(what);
}

template <class T>
T* device_array(size_t n) {
  void* p = nullptr;
  expect(cudaMalloc(&p, n * sizeof(T)) == cudaSuccess, "cudaMalloc");
  return static_cast<T*>(p);
}

template <class T>
std::vector<T> to_host(const T* d, size_t n) {
  std::vector<T> h(n);
  expect(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost) == cudaSuccess, "cudaMemcpy to the host");
  return h;
}

template <class T>
T* to_device(const std::vector<T>& h) {
  T* d = device_array<T>(h.size());
  expect(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice) == cudaSuccess, "cudaMemcpy to the device");
  return d;
}

// The last launch's error (cleared) and its message.
std::pair<cudaError_t, std::string> launch_error() {
  const cudaError_t e = cudaGetLastError();
  return {e, cudaGetErrorString(e)};
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

void set_order(const char* order) { setenv("PALMCORE_EMULATE_ORDER", order, 1); }

// ---- checks ----------------------------------------------------------------------------------

void check_reduction_needs_barriers() {
  std::vector<float> x(2 * kThreads);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 7);
  float* dx = to_device(x);
  float* out = device_array<float>(2);
  tree_sum<<<2, kThreads>>>(dx, out, true);
  expect(launch_error().first == cudaSuccess, "the reduction launches");
  const std::vector<float> good = to_host(out, 2);
  float want0 = 0, want1 = 0;
  for (int i = 0; i < kThreads; ++i) want0 += x[i], want1 += x[kThreads + i];
  expect(good[0] == want0 && good[1] == want1, "with __syncthreads the tree gives the sum");
  // Without the barriers thread 0 adds slots no thread has written yet (NaN) in the default
  // forward order; the reverse order happens to be a serialisation that gives the sum, which is
  // why a kernel is run under several orders.
  tree_sum<<<2, kThreads>>>(dx, out, false);
  expect(launch_error().first == cudaSuccess, "the racy reduction launches");
  const std::vector<float> bad = to_host(out, 2);
  expect(!(bad[0] == want0 && bad[1] == want1), "without __syncthreads the sum is wrong");
  cudaFree(dx);
  cudaFree(out);
}

void check_divergent_barrier() {
  float* out = device_array<float>(kThreads);
  early_exit<<<1, kThreads>>>(out, kThreads);
  expect(launch_error().first == cudaSuccess, "every thread at the barrier: fine");
  early_exit<<<1, kThreads>>>(out, 100);
  const auto [e, message] = launch_error();
  expect(e == cudaErrorLaunchFailure, "a barrier some threads skip fails the launch");
  expect(contains(message, "early_exit") && contains(message, "reached by 100 of the block's 128") &&
             contains(message, "exited"),
         "the message names the kernel and the threads: " + message);
  two_barriers<<<1, 64>>>(out);
  const auto [e2, message2] = launch_error();
  expect(e2 == cudaErrorLaunchFailure && contains(message2, "different barriers") && contains(message2, "two_barriers"),
         "threads at two barriers: " + message2);
  cudaFree(out);
}

void check_host_pointer_refused() {
  std::vector<float> host(16);
  fill_kernel<<<1, 16>>>(host.data(), 1.0f, 16);
  const auto [e, message] = launch_error();
  expect(e == cudaErrorIllegalAddress && contains(message, "fill_kernel") && contains(message, "argument 0"),
         "a host pointer is refused naming the kernel and argument: " + message);
  expect(host[0] == 0.0f, "and the kernel did not run");
  float* d = device_array<float>(16);
  cudaFree(d);
  fill_kernel<<<1, 16>>>(d, 1.0f, 16);
  expect(launch_error().first == cudaErrorIllegalAddress, "so is a freed buffer");
}

void check_launch_limits() {
  float* out = device_array<float>(2048);
  fill_kernel<<<1, 1024>>>(out, 1.0f, 1024);
  expect(launch_error().first == cudaSuccess, "1024 threads a block launch");
  fill_kernel<<<1, 1025>>>(out, 1.0f, 1024);
  expect(launch_error().first == cudaErrorInvalidConfiguration, "1025 threads a block do not");
  fill_kernel<<<dim3(1, 65535), 1>>>(out, 1.0f, 1);
  expect(launch_error().first == cudaSuccess, "grid y 65535 launches");
  fill_kernel<<<dim3(1, 65536), 1>>>(out, 1.0f, 1);
  expect(launch_error().first == cudaErrorInvalidConfiguration, "grid y 65536 does not");
  fill_kernel<<<dim3(1, 1, 65536), 1>>>(out, 1.0f, 1);
  expect(launch_error().first == cudaErrorInvalidConfiguration, "grid z 65536 does not");
  uses_dynamic_shared<<<1, 32, 48 * 1024>>>(out);
  expect(launch_error().first == cudaSuccess, "48 KiB of dynamic shared memory launch");
  uses_dynamic_shared<<<1, 32, 64 * 1024>>>(out);
  const auto [e, message] = launch_error();
  expect(e == cudaErrorInvalidValue && contains(message, "cudaFuncSetAttribute"),
         "64 KiB need cudaFuncSetAttribute: " + message);
  expect(cudaFuncSetAttribute(uses_dynamic_shared, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024) ==
             cudaSuccess,
         "raising the limit to 64 KiB");
  uses_dynamic_shared<<<1, 32, 64 * 1024>>>(out);
  expect(launch_error().first == cudaSuccess, "then 64 KiB launch");
  const std::vector<float> back = to_host(out, 32);
  expect(back[0] == 1.0f && back[31] == 0.0f, "and read their shared memory back");
  expect(cudaFuncSetAttribute(uses_dynamic_shared, cudaFuncAttributeMaxDynamicSharedMemorySize, 228 * 1024) ==
             cudaErrorInvalidValue,
         "228 KiB are beyond sm_90's opt-in 227 KiB");
  cudaGetLastError();
  uses_dynamic_shared<<<1, 32, 228 * 1024>>>(out);
  expect(launch_error().first == cudaErrorInvalidValue, "and cannot be launched");
  cudaFree(out);
}

void check_races_show_under_another_order() {
  int* out = device_array<int>(kThreads);
  std::map<std::string, std::vector<int>> racy, fixed;
  for (const char* order : {"forward", "reverse", "shuffle:1", "shuffle:2"}) {
    set_order(order);
    neighbour<<<1, kThreads>>>(out, false);
    expect(launch_error().first == cudaSuccess, "the racy kernel launches");
    racy[order] = to_host(out, kThreads);
    neighbour<<<1, kThreads>>>(out, true);
    expect(launch_error().first == cudaSuccess, "the fixed kernel launches");
    fixed[order] = to_host(out, kThreads);
  }
  set_order("forward");
  expect(racy["forward"] != racy["reverse"], "the racy kernel's output depends on the threads' order");
  expect(racy["shuffle:1"] != racy["shuffle:2"], "and on the shuffle's seed");
  for (const auto& [order, v] : fixed)
    for (int t = 0; t < kThreads; ++t) expect(v[t] == ((t + 1) % kThreads) * 10, std::string("fixed: ") + order);
  set_order("sideways");
  neighbour<<<1, kThreads>>>(out, true);
  const auto [e, message] = launch_error();
  set_order("forward");
  expect(e == cudaErrorLaunchFailure && contains(message, "PALMCORE_EMULATE_ORDER"), "a bad order is refused: " + message);
  cudaFree(out);
}

void check_unwritten_shared_memory_is_nan() {
  float* out = device_array<float>(2 * kThreads);
  read_unwritten<<<1, kThreads, kThreads * sizeof(float)>>>(out);
  expect(launch_error().first == cudaSuccess, "launches");
  for (float v : to_host(out, 2 * kThreads)) expect(std::isnan(v), "unwritten shared memory reads as NaN");
  void* fresh = nullptr;
  cudaMalloc(&fresh, 64);
  for (float v : to_host(static_cast<float*>(fresh), 16)) expect(std::isnan(v), "so does fresh device memory");
  cudaFree(fresh);
  cudaFree(out);
}

void check_warp_collectives() {
  float* sums = device_array<float>(64);
  warp_sum<<<1, 64>>>(sums);
  expect(launch_error().first == cudaSuccess, "warp_sum launches");
  for (float v : to_host(sums, 64)) expect(v == 528.0f, "the butterfly gives Σ 1..32 = 528 on every lane");
  unsigned* out = device_array<unsigned>(160);
  warp_partial<<<1, 32>>>(out);
  const auto [e0, m0] = launch_error();
  expect(e0 == cudaSuccess, "warp_partial launches: " + m0);
  const std::vector<unsigned> r = to_host(out, 160);
  for (int l = 0; l < 16; ++l) expect(r[l] == 120, "half-warp sum under mask 0x0000ffff");
  for (int l = 16; l < 32; ++l) expect(r[l] == 0xaaaa0000u, "ballot of the odd upper lanes under mask 0xffff0000");
  for (int l = 0; l < 32; ++l) {
    expect(r[32 + l] == static_cast<unsigned>(l % 8 == 7 ? l : l + 1), "shfl_down width 8 at lane " + std::to_string(l));
    expect(r[64 + l] == static_cast<unsigned>(l % 8 < 2 ? l : l - 2), "shfl_up width 8 at lane " + std::to_string(l));
    expect(r[96 + l] == static_cast<unsigned>(l / 8 * 8 + 3), "shfl width 8 at lane " + std::to_string(l));
    expect(r[128 + l] == 3, "any and all");
  }
  warp_lane_exits<<<1, 32>>>(sums);
  const auto [e, message] = launch_error();
  expect(e == cudaErrorLaunchFailure && contains(message, "lane 5") && contains(message, "exited"),
         "a named lane that exits fails the launch: " + message);
  warp_reads_outside<<<1, 32>>>(sums);
  const auto [e2, message2] = launch_error();
  expect(e2 == cudaErrorLaunchFailure && contains(message2, "leaves out"), "reading a lane outside the mask: " + message2);
  cudaFree(sums);
  cudaFree(out);
}

void check_barrier_reductions() {
  int* out = device_array<int>(3);
  for (int n : {0, 5, kThreads}) {
    barrier_reductions<<<1, kThreads>>>(out, n);
    expect(launch_error().first == cudaSuccess, "launches");
    const std::vector<int> r = to_host(out, 3);
    expect(r[0] == (n > 0) && r[1] == (n == kThreads) && r[2] == n, "_or, _and, _count of t < " + std::to_string(n));
  }
  cudaFree(out);
}

void check_exceptions_become_launch_errors() {
  float* out = device_array<float>(8);
  traps<<<1, 8>>>(out);
  const auto [e, message] = launch_error();
  expect(e == cudaErrorLaunchFailure && contains(message, "__trap") && contains(message, "traps") &&
             contains(message, "thread (3, 0, 0)"),
         "a trap is the launch's error, naming kernel and thread: " + message);
  fill_kernel<<<1, 8>>>(out, 2.0f, 8);
  expect(launch_error().first == cudaSuccess && to_host(out, 8)[7] == 2.0f, "and the device works on");
  cudaFree(out);
}

void check_template_launches() {
  std::vector<float> x = {1, 2, 3, 4, 5};
  float* dx = to_device(x);
  float* dy = device_array<float>(5);
  scale_by<<<1, 8>>>(dx, dy, 2.0f,
                     5);  // deduced T, the arguments over two lines
  std::vector<int> xi = {1, 2, 3};
  int* di = to_device(xi);
  add_const<7><<<1, 4, 0, nullptr>>>(di, 3);
  expect(launch_error().first == cudaSuccess, "both launch");
  expect(to_host(dy, 5) == std::vector<float>({2, 4, 6, 8, 10}), "deduced template arguments");
  expect(to_host(di, 3) == std::vector<int>({8, 9, 10}), "explicit template arguments");
  cudaFree(dx);
  cudaFree(dy);
  cudaFree(di);
}

void check_memory_limit() {
  setenv("PALMCORE_EMULATE_MEMORY", "1048576", 1);
  size_t free_bytes = 0, total = 0;
  cudaMemGetInfo(&free_bytes, &total);
  expect(total == 1048576 && free_bytes <= total, "cudaMemGetInfo reports PALMCORE_EMULATE_MEMORY");
  void* a = nullptr;
  expect(cudaMalloc(&a, 512 * 1024) == cudaSuccess, "half of it is given");
  size_t after = 0;
  cudaMemGetInfo(&after, &total);
  expect(after == free_bytes - 512 * 1024, "and counted");
  void* b = nullptr;
  expect(cudaMalloc(&b, 768 * 1024) == cudaErrorMemoryAllocation, "beyond it: cudaErrorMemoryAllocation");
  cudaGetLastError();
  cudaFree(a);
  unsetenv("PALMCORE_EMULATE_MEMORY");
}

void check_graph_capture_replays() {
  cudaStream_t stream = nullptr;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  int* x = to_device(std::vector<int>{0, 0});
  expect(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal) == cudaSuccess, "capture begins");
  add_const<1><<<1, 2, 0, stream>>>(x, 2);
  add_const<10><<<1, 2, 0, stream>>>(x, 2);
  cudaGraph_t graph = nullptr;
  expect(cudaStreamEndCapture(stream, &graph) == cudaSuccess && graph, "capture ends");
  expect(to_host(x, 2) == std::vector<int>({0, 0}), "captured launches do not run");
  cudaGraphExec_t exec = nullptr;
  expect(cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess, "instantiate");
  cudaGraphDestroy(graph);
  cudaGraphLaunch(exec, stream);
  cudaGraphLaunch(exec, stream);
  expect(to_host(x, 2) == std::vector<int>({22, 22}), "each replay runs them in order");
  // a capture that allocates is invalidated
  expect(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal) == cudaSuccess, "capture again");
  void* p = nullptr;
  expect(cudaMalloc(&p, 16) == cudaErrorStreamCaptureUnsupported, "cudaMalloc while capturing is refused");
  expect(cudaStreamEndCapture(stream, &graph) == cudaErrorStreamCaptureInvalidated && !graph, "and ends the capture");
  cudaGetLastError();
  cudaGraphExecDestroy(exec);
  cudaStreamDestroy(stream);
  cudaFree(x);
}

const std::vector<std::pair<std::string, std::function<void()>>> kChecks = {
    {"reduction_needs_barriers", check_reduction_needs_barriers},
    {"divergent_barrier", check_divergent_barrier},
    {"host_pointer_refused", check_host_pointer_refused},
    {"launch_limits", check_launch_limits},
    {"races_show_under_another_order", check_races_show_under_another_order},
    {"unwritten_shared_memory_is_nan", check_unwritten_shared_memory_is_nan},
    {"warp_collectives", check_warp_collectives},
    {"barrier_reductions", check_barrier_reductions},
    {"exceptions_become_launch_errors", check_exceptions_become_launch_errors},
    {"template_launches", check_template_launches},
    {"memory_limit", check_memory_limit},
    {"graph_capture_replays", check_graph_capture_replays},
};

}  // namespace

// `checks out_of_bounds`: a kernel writes past a device buffer's end. Under AddressSanitizer
// (CXXFLAGS=-fsanitize=address) the process stops there with a heap-buffer-overflow report
// naming checks.cu's line; without it the write goes unnoticed and this returns 0.
int out_of_bounds() {
  float* out = device_array<float>(8);
  write_past_end<<<1, 8>>>(out, 8);
  std::printf("the write past the end went unnoticed: %s\n", cudaGetErrorString(cudaGetLastError()));
  return 0;
}

int main(int argc, char** argv) {
  std::vector<std::string> wanted(argv + 1, argv + argc);
  if (wanted == std::vector<std::string>{"out_of_bounds"}) return out_of_bounds();
  int failed = 0, ran = 0;
  for (const auto& [name, check] : kChecks) {
    if (!wanted.empty() && std::find(wanted.begin(), wanted.end(), name) == wanted.end()) continue;
    ++ran;
    try {
      check();
      std::printf("PASS %s\n", name.c_str());
    } catch (const std::exception& e) {
      ++failed;
      std::printf("FAIL %s: %s\n", name.c_str(), e.what());
    }
  }
  std::printf("%d of %d checks passed\n", ran - failed, ran);
  return failed == 0 && ran > 0 ? 0 : 1;
}
