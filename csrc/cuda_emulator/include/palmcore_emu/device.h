// The kernel side of the emulated CUDA device (csrc/cuda_emulator/README.md): what a .cu file
// compiled by the host compiler sees in place of nvcc's built-ins. Each CUDA thread of a block
// is a fiber of one OS thread (executor.cpp); the threads of a block are switched only where
// CUDA threads wait for each other (__syncthreads and its forms, the warp operations), so
// everything between two such points runs as one uninterrupted piece of one thread.
//
// threadIdx, blockIdx, blockDim, gridDim read the running fiber's state. Shared memory is the
// running block's: rewrite.py turns `__shared__ T x[N];` into a reference to
// shared_static<T[N]>(id) and `extern __shared__ T x[];` into a pointer from shared_dynamic<T>();
// both are filled with 0xFF bytes (a NaN in every float type) when a block starts.
#pragma once

#include <math.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---- CUDA's keywords: ordinary (inline) host functions ---------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

using cudaStream_t = struct CUstream_st*;
// Values as the CUDA runtime's, so that code comparing them behaves alike.
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInitializationError = 3,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevicePointer = 17,
  cudaErrorInvalidMemcpyDirection = 21,
  cudaErrorInsufficientDriver = 35,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorIllegalState = 401,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchFailure = 719,
  cudaErrorStreamCaptureUnsupported = 900,
  cudaErrorStreamCaptureInvalidated = 901,
  cudaErrorStreamCaptureWrongThread = 908,
};

namespace palmcore_emu {

constexpr int kWarpSize = 32;

// ---- the running thread (executor.cpp) --------------------------------------------------------
const uint3& thread_index();
const uint3& block_index();
const dim3& block_dim();
const dim3& grid_dim();

// Block-wide barrier of the running thread's block: every live thread of the block must reach
// the same barrier (file, line), or the launch fails naming the kernel. Returns the reduction of
// `predicate` over the block for the _or / _and / _count forms.
enum class BarrierKind { Sync, Or, And, Count };
int block_barrier(BarrierKind kind, int predicate, const char* file, int line);

// Warp collectives: the lanes named in `mask` (all of which must call the same operation with
// the same mask) exchange 64-bit values; a named lane that exits or waits elsewhere fails the
// launch. Returns this lane's result (see executor.cpp for each operation's rule).
enum class WarpOp { Sync, Shfl, ShflUp, ShflDown, ShflXor, Ballot, Any, All, Exchange };
uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int lane_arg, int width, const char* file,
                         int line);
unsigned active_mask();
// A collective of all 32 lanes over data of any size (the tensor-core instructions,
// tensor_core.cpp): once every lane of the warp has called it at the same place,
// combine(ins, outs) runs once with each lane's `in` and `out`, indexed by lane.
using WarpCombine = void (*)(const void* const* ins, void* const* outs);
void warp_exchange(const void* in, void* out, WarpCombine combine, const char* what, const char* file, int line);

// Shared memory of the running block (16-byte aligned, 0xFF-filled at the block's start).
void* shared_static_bytes(int id, size_t bytes, size_t alignment);
void* shared_dynamic_bytes();
template <class T>
T& shared_static(int id) {
  return *static_cast<T*>(shared_static_bytes(id, sizeof(T), alignof(T)));
}
template <class T>
T* shared_dynamic() {
  return static_cast<T*>(shared_dynamic_bytes());
}

[[noreturn]] void trap(const char* file, int line);

// ---- launches (executor.cpp, runtime.cpp) ----------------------------------------------------
struct LaunchConfig {
  dim3 grid, block;
  size_t shared_bytes = 0;
  const char* kernel = "";
  const void* address = nullptr;  // the kernel function (cudaFuncSetAttribute's key), or null
};
// Checks the configuration and the pointer arguments (each must lie in a live device
// allocation, or be null), then runs the grid now, or records it when `stream` is capturing.
// Returns the launch's error (also kept for cudaGetLastError).
cudaError_t submit(const LaunchConfig& config, const std::vector<std::pair<int, const void*>>& pointers,
                   std::function<void()> body, cudaStream_t stream);

template <class T>
void collect_pointer(std::vector<std::pair<int, const void*>>& out, int index, const T& value) {
  if constexpr (std::is_pointer_v<T>) out.emplace_back(index, static_cast<const void*>(value));
}

// kernel<<<grid, block, shared, stream>>>(args...) as rewrite.py writes it: `kernel` calls the
// real kernel (a generic lambda, so that template arguments are deduced from `args`), each
// thread with its own copies of the arguments.
template <class Kernel, class... Args>
void launch(dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream, const char* name, const void* address,
            Kernel kernel, const Args&... args) {
  std::vector<std::pair<int, const void*>> pointers;
  int index = 0;
  (collect_pointer(pointers, index++, args), ...);
  auto values = std::make_tuple(args...);
  submit(LaunchConfig{grid, block, shared_bytes, name, address}, pointers,
         [kernel, values]() { std::apply(kernel, values); }, stream);
}
// Arithmetic that must round as written (never contracted into an FMA by the host compiler):
// out of line, in intrinsics.cpp.
float mul_rn(float x, float y);
float add_rn(float x, float y);
float sub_rn(float x, float y);
double add_rn(double x, double y);

template <class T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "a warp exchanges at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof v);
  return bits;
}
template <class T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

}  // namespace palmcore_emu

#define threadIdx (::palmcore_emu::thread_index())
#define blockIdx (::palmcore_emu::block_index())
#define blockDim (::palmcore_emu::block_dim())
#define gridDim (::palmcore_emu::grid_dim())
constexpr int warpSize = palmcore_emu::kWarpSize;

#define __syncthreads() ((void)::palmcore_emu::block_barrier(::palmcore_emu::BarrierKind::Sync, 0, __FILE__, __LINE__))
#define __syncthreads_or(p) \
  (::palmcore_emu::block_barrier(::palmcore_emu::BarrierKind::Or, (p) != 0, __FILE__, __LINE__))
#define __syncthreads_and(p) \
  (::palmcore_emu::block_barrier(::palmcore_emu::BarrierKind::And, (p) != 0, __FILE__, __LINE__))
#define __syncthreads_count(p) \
  (::palmcore_emu::block_barrier(::palmcore_emu::BarrierKind::Count, (p) != 0, __FILE__, __LINE__))
#define __syncwarp(...) ::palmcore_emu::SyncWarp{__FILE__, __LINE__}(__VA_ARGS__)
#define __shfl_sync(...) ::palmcore_emu::shfl(::palmcore_emu::WarpOp::Shfl, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::palmcore_emu::shfl(::palmcore_emu::WarpOp::ShflUp, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::palmcore_emu::shfl(::palmcore_emu::WarpOp::ShflDown, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) ::palmcore_emu::shfl(::palmcore_emu::WarpOp::ShflXor, __FILE__, __LINE__, __VA_ARGS__)
#define __ballot_sync(mask, p) \
  static_cast<unsigned>(::palmcore_emu::warp_collective(::palmcore_emu::WarpOp::Ballot, (mask), (p) != 0, 0, 32, __FILE__, __LINE__))
#define __any_sync(mask, p) \
  static_cast<int>(::palmcore_emu::warp_collective(::palmcore_emu::WarpOp::Any, (mask), (p) != 0, 0, 32, __FILE__, __LINE__))
#define __all_sync(mask, p) \
  static_cast<int>(::palmcore_emu::warp_collective(::palmcore_emu::WarpOp::All, (mask), (p) != 0, 0, 32, __FILE__, __LINE__))
#define __activemask() ::palmcore_emu::active_mask()
#define __trap() ::palmcore_emu::trap(__FILE__, __LINE__)

namespace palmcore_emu {
struct SyncWarp {
  const char* file;
  int line;
  void operator()(unsigned mask = 0xffffffffu) const { warp_collective(WarpOp::Sync, mask, 0, 0, kWarpSize, file, line); }
};
template <class T>
T shfl(WarpOp op, const char* file, int line, unsigned mask, T value, int lane_arg, int width = kWarpSize) {
  return from_bits<T>(warp_collective(op, mask, to_bits(value), lane_arg, width, file, line));
}
}  // namespace palmcore_emu

// ---- device intrinsics the kernels use ---------------------------------------------------------
inline float __fmul_rn(float x, float y) { return palmcore_emu::mul_rn(x, y); }
inline float __fadd_rn(float x, float y) { return palmcore_emu::add_rn(x, y); }
inline float __fsub_rn(float x, float y) { return palmcore_emu::sub_rn(x, y); }
inline double __dadd_rn(double x, double y) { return palmcore_emu::add_rn(x, y); }
inline double __fma_rn(double x, double y, double z) { return std::fma(x, y, z); }
inline unsigned __float_as_uint(float x) { return palmcore_emu::from_bits<unsigned>(palmcore_emu::to_bits(x)); }
inline float __uint_as_float(unsigned x) { return palmcore_emu::from_bits<float>(palmcore_emu::to_bits(x)); }
inline long long __double_as_longlong(double x) { return palmcore_emu::from_bits<long long>(palmcore_emu::to_bits(x)); }
inline double __longlong_as_double(long long x) { return palmcore_emu::from_bits<double>(palmcore_emu::to_bits(x)); }

// CUDA's min / max over mixed integer types: the usual arithmetic conversions, as its overloads;
// on floating types fmin / fmax (a NaN loses).
template <class A, class B>
std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>)
    return std::fmin(static_cast<C>(a), static_cast<C>(b));
  else
    return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <class A, class B>
std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>)
    return std::fmax(static_cast<C>(a), static_cast<C>(b));
  else
    return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}
