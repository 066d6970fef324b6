// The tensor-core instructions of the emulated device (include/palmcore_emu/tensor_core.h) as
// warp collectives, with every lane's registers placed as the PTX ISA describes them (section
// "Warp-level matrix load instruction: ldmatrix" and "Matrix Fragments for mma.m16n8k16 with
// floating point type"), with groupID = lane / 4 and threadID_in_group = lane % 4:
//
//   ldmatrix .m8n8.x4 .b16: lanes 8m..8m+7 give the addresses of rows 0..7 of matrix m (16
//     bytes each, 16-byte aligned); register m of lane l holds row groupID, elements
//     2 threadID_in_group and 2 threadID_in_group + 1 of matrix m (low half first); with .trans
//     the same positions of matrix m's transpose.
//   mma .m16n8k16 .bf16, A 16x16 row-major: element a_i (i = 0..7, register i / 2, low half for
//     even i) is A[groupID + 8 if i in {2, 3, 6, 7}][2 threadID_in_group + (i & 1) + 8 if i >= 4];
//     B 16x8: b_i (i = 0..3) is B[2 threadID_in_group + (i & 1) + 8 if i >= 2][groupID];
//     C, D 16x8 f32: c_i (i = 0..3) is C[groupID + 8 if i >= 2][2 threadID_in_group + (i & 1)].
//   D = A·B + C with the products of bf16 values exact in float and the sum over k in order
//   (a GPU's tensor cores sum in an order of their own: the bits may differ in the last place).
//
// These tables are written from the ISA, independently of palmcore's csrc/cuda/mma_fragments.h,
// so that the flash kernels' own index maps are checked against them.
#include "palmcore_emu/tensor_core.h"

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "palmcore_emu/device.h"

namespace palmcore_emu {
namespace {

uint16_t half_of(uint32_t r, int e) { return static_cast<uint16_t>(e ? r >> 16 : r & 0xffffu); }

float bf16_value(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &wide, sizeof f);
  return f;
}

uint16_t element(const void* row, int column) {
  uint16_t v;
  std::memcpy(&v, static_cast<const char*>(row) + 2 * column, sizeof v);
  return v;
}

template <bool kTrans>
void ldmatrix_combine(const void* const* ins, void* const* outs) {
  const void* rows[32];
  for (int l = 0; l < 32; ++l) {
    rows[l] = *static_cast<const void* const*>(ins[l]);
    if (reinterpret_cast<uintptr_t>(rows[l]) % 16 != 0)
      throw std::runtime_error("ldmatrix: lane " + std::to_string(l) + "'s row address is not 16-byte aligned");
  }
  for (int l = 0; l < 32; ++l) {
    uint32_t* r = static_cast<uint32_t*>(outs[l]);
    const int group = l / 4, in_group = l % 4;
    for (int m = 0; m < 4; ++m) {
      uint32_t packed = 0;
      for (int e = 0; e < 2; ++e) {
        const int column = 2 * in_group + e;
        // matrix m's element (group, column), or with .trans its element (column, group)
        const uint16_t v = kTrans ? element(rows[8 * m + column], group) : element(rows[8 * m + group], column);
        packed |= static_cast<uint32_t>(v) << (16 * e);
      }
      r[m] = packed;
    }
  }
}

struct MmaLane {
  uint32_t a[4], b[2];
  float c[4];
};

void mma_combine(const void* const* ins, void* const* outs) {
  float A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    const MmaLane& in = *static_cast<const MmaLane*>(ins[l]);
    const int group = l / 4, in_group = l % 4;
    for (int i = 0; i < 8; ++i) {
      const int row = group + ((i & 2) ? 8 : 0), col = 2 * in_group + (i & 1) + (i >= 4 ? 8 : 0);
      A[row][col] = bf16_value(half_of(in.a[i / 2], i & 1));
    }
    for (int i = 0; i < 4; ++i) B[2 * in_group + (i & 1) + (i >= 2 ? 8 : 0)][group] = bf16_value(half_of(in.b[i / 2], i & 1));
    for (int i = 0; i < 4; ++i) C[group + (i >= 2 ? 8 : 0)][2 * in_group + (i & 1)] = in.c[i];
  }
  for (int l = 0; l < 32; ++l) {
    float* d = static_cast<float*>(outs[l]);
    const int group = l / 4, in_group = l % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = group + (i >= 2 ? 8 : 0), col = 2 * in_group + (i & 1);
      float sum = C[row][col];
      for (int k = 0; k < 16; ++k) sum = std::fma(A[row][k], B[k][col], sum);
      d[i] = sum;
    }
  }
}

}  // namespace

void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans, const char* file, int line) {
  warp_exchange(&row, r, trans ? ldmatrix_combine<true> : ldmatrix_combine<false>,
                trans ? "ldmatrix.x4.trans" : "ldmatrix.x4", file, line);
}

void mma_m16n8k16_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, const char* file, int line) {
  const MmaLane in{{a[0], a[1], a[2], a[3]}, {b0, b1}, {c[0], c[1], c[2], c[3]}};
  warp_exchange(&in, c, mma_combine, "mma.m16n8k16", file, line);
}

}  // namespace palmcore_emu
