// The tensor-core instructions of cuda/flash_attention.cu, each behind a small device function:
// mma.sync.m16n8k16 (bf16 in, f32 accumulate), ldmatrix.x4 (with and without .trans) and
// cp.async with its commit and wait. Under nvcc they are the PTX itself; in the emulated build
// (PALMCORE_CUDA=EMULATE) they are the emulator's warp-collective versions
// (csrc/cuda_emulator/tensor_core.cpp), written from the PTX ISA's fragment tables independently
// of cuda/mma_fragments.h, so that the kernels' index maps are checked against the ISA.
//
//   cp_async16 / cp_async4(dst, src)  copy 16 / 4 bytes of global memory to shared memory,
//                                     asynchronously: done once a wait covers its group
//   cp_async_commit()                 closes this thread's group of copies issued since the last
//   cp_async_wait<kPending>()         waits until at most kPending committed groups are in flight
//   ldmatrix_x4(r, p)                 (warp) lanes 8m..8m+7 give the rows of 8x8 matrix m;
//                                     r[m] = this lane's 2 elements of matrix m (.trans: of its
//                                     transpose)
//   mma_bf16(c, a, b0, b1)            (warp) c += a · b, 16x16 bf16 times 16x8 bf16
#pragma once

#include <cstdint>

#include "palmcore/math/bf16.h"

#ifdef PALMCORE_CUDA_EMULATED
#include "palmcore_emu/tensor_core.h"
#endif

namespace palmcore::cuda {

#ifdef PALMCORE_CUDA_EMULATED

inline void cp_async16(void* dst, const void* src) { palmcore_emu::cp_async(dst, src, 16); }
inline void cp_async4(void* dst, const void* src) { palmcore_emu::cp_async(dst, src, 4); }
inline void cp_async_commit() { palmcore_emu::cp_async_commit(); }
template <int kPending>
void cp_async_wait() {
  palmcore_emu::cp_async_wait(kPending);
}
// (the caller's file and line name the collective in the emulator's errors)
inline void ldmatrix_x4(uint32_t (&r)[4], const bf16* p, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  palmcore_emu::ldmatrix_x4(r, p, false, file, line);
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const bf16* p, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  palmcore_emu::ldmatrix_x4(r, p, true, file, line);
}
inline void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                     const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  palmcore_emu::mma_m16n8k16_bf16(c, a, b0, b1, file, line);
}

#else

// bf16 mma.sync, ldmatrix and cp.async need sm_80. Compiled for an older architecture (a build
// that lists one), each wrapper traps instead, and flash_attention_supports() keeps such a
// device on the plain kernels.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define PALMCORE_SM80(...) __trap()
#else
#define PALMCORE_SM80(...) __VA_ARGS__
#endif

[[maybe_unused]] __device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  PALMCORE_SM80(asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared_address(dst)),
               "l"(__cvta_generic_to_global(src))
               : "memory"));
}

__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
  PALMCORE_SM80(asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(shared_address(dst)),
               "l"(__cvta_generic_to_global(src))
               : "memory"));
}

__device__ __forceinline__ void cp_async_commit() { PALMCORE_SM80(asm volatile("cp.async.commit_group;\n" ::: "memory")); }

// Wait until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  PALMCORE_SM80(asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory"));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const bf16* p) {
  PALMCORE_SM80(asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(p))
               : "memory"));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const bf16* p) {
  PALMCORE_SM80(asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(p))
               : "memory"));
}

// c += a · b (16x16 bf16 times 16x8 bf16, float accumulators).
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  PALMCORE_SM80(asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1)));
}

#endif

}  // namespace palmcore::cuda
