// Index maps of the warp-level tensor-core tiles used by cuda/flash_attention.cu, as functions
// of the lane (0..31), shared with a host check (PALMCORE_HD): where each of a lane's values of
// mma.m16n8k16 (bf16 in, f32 accumulate) sits in its matrix, and which shared-memory row each
// lane hands to ldmatrix.x4 so that the four loaded 8x8 matrices are exactly those fragments.
//
// From the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point type", "ldmatrix"),
// with group = lane / 4 and quad = lane % 4:
//   A 16x16 (row major), 4 registers of 2 bf16: register r, half e (e = 0 the low 16 bits) is
//     A[group + 8 (r % 2)][2 quad + e + 8 (r / 2)]
//   B 16x8 (k x n), 2 registers of 2 bf16: register r, half e is B[2 quad + e + 8 r][group]
//   C 16x8 float, 4 values: value i is C[group + 8 (i / 2)][2 quad + i % 2]
//   ldmatrix.x4: lanes 8m..8m+7 give the addresses of rows 0..7 of matrix m (16 bytes each);
//     register m of a lane gets matrix m's elements (group, 2 quad + e), or with .trans its
//     elements (2 quad + e, group).
// Hence the scores' C fragments of two adjacent 8-column tiles are, value for value, the A
// fragment of the 16 columns (a_from_c), which is how p and ds' feed the next product.
#pragma once

#include <cstdint>

#include "palmcore/math/bf16.h"
#include "palmcore/math/host_device.h"

#ifdef __CUDACC__
#include <cuda_bf16.h>
#endif

namespace palmcore::cuda::mma {

// Position of value i (0..3) of a lane's C fragment in the 16x8 tile.
PALMCORE_HD int c_row(int lane, int i) { return lane / 4 + 8 * (i / 2); }
PALMCORE_HD int c_col(int lane, int i) { return 2 * (lane % 4) + i % 2; }
// Position of half e of register r of a lane's A fragment in the 16x16 tile.
PALMCORE_HD int a_row(int lane, int r) { return lane / 4 + 8 * (r % 2); }
PALMCORE_HD int a_col(int lane, int r, int e) { return 2 * (lane % 4) + e + 8 * (r / 2); }
// Position (k, n) of half e of register r of a lane's B fragment in the 16x8 tile.
PALMCORE_HD int b_k(int lane, int r, int e) { return 2 * (lane % 4) + e + 8 * r; }
PALMCORE_HD int b_n(int lane) { return lane / 4; }

// The shared-memory row and column (relative to a 16x16 block at its top-left) whose address
// a lane gives to ldmatrix.x4, for the three ways the kernels read a row-major tile M:
//   a_fragment   A = M[r0.., c0..] (16x16): registers 0..3 = the A fragment
//   b_pair       B = M[n0.., k0..]ᵀ, i.e. B[k][n] = M[n][k] (two 16x8 tiles, n0 and n0 + 8):
//                registers {0, 1} = B fragment of columns n0.., {2, 3} of n0 + 8..
//   b_pair_trans B = M[k0.., n0..] (B[k][n] = M[k][n], with .trans), registers as b_pair
// Matrix m = lane / 8 holds rows (lane % 8) of one 8x8 quarter:
//   a_fragment, b_pair_trans: quarter (row 8 (m % 2), col 8 (m / 2))
//   b_pair:                   quarter (row 8 (m / 2), col 8 (m % 2))
PALMCORE_HD int ldsm_a_row(int lane) { return lane % 8 + 8 * ((lane / 8) % 2); }
PALMCORE_HD int ldsm_a_col(int lane) { return 8 * (lane / 16); }
PALMCORE_HD int ldsm_b_row(int lane) { return lane % 8 + 8 * (lane / 16); }
PALMCORE_HD int ldsm_b_col(int lane) { return 8 * ((lane / 8) % 2); }

// Two floats as a register of two bf16, each rounded to the nearest (ties to even): lo in the
// low 16 bits (the element of the lower column in a fragment).
PALMCORE_HD uint32_t pack_bf16(float lo, float hi) {
#ifdef __CUDA_ARCH__
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return static_cast<uint32_t>(__bfloat16_as_ushort(v.x)) | (static_cast<uint32_t>(__bfloat16_as_ushort(v.y)) << 16);
#else
  return static_cast<uint32_t>(to_bf16(lo).bits) | (static_cast<uint32_t>(to_bf16(hi).bits) << 16);
#endif
}
// x rounded to the nearest bf16 (ties to even), kept as a float.
PALMCORE_HD float rounded_bf16(float x) {
#ifdef __CUDA_ARCH__
  return __bfloat162float(__float2bfloat16_rn(x));
#else
  return palmcore::round_bf16(x);
#endif
}

// The A fragment (16 rows x 16 columns, bf16) of C fragments lo (columns 0..7) and hi (8..15).
PALMCORE_HD void a_from_c(const float (&lo)[4], const float (&hi)[4], uint32_t (&a)[4]) {
  a[0] = pack_bf16(lo[0], lo[1]);
  a[1] = pack_bf16(lo[2], lo[3]);
  a[2] = pack_bf16(hi[0], hi[1]);
  a[3] = pack_bf16(hi[2], hi[3]);
}

}  // namespace palmcore::cuda::mma
