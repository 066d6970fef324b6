// The emulated device's tensor-core instructions (tensor_core.cpp), behind palmcore's
// csrc/cuda/tensor_core.h: warp collectives over the 32 lanes of the calling warp, each lane's
// registers placed as the PTX ISA's fragment tables say.
#pragma once

#include <cstddef>
#include <cstdint>

namespace palmcore_emu {

// cp.async: `bytes` from global memory at src to shared memory at dst, done when a
// cp_async_wait covers the group it was committed in (not before: reading dst earlier shows the
// old contents, as it may on a GPU).
void cp_async(void* dst, const void* src, size_t bytes);
void cp_async_commit();
void cp_async_wait(int pending_groups);

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 with this lane's row address.
void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans, const char* file, int line);
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, c += a · b.
void mma_m16n8k16_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, const char* file, int line);

}  // namespace palmcore_emu
