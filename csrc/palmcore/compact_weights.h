// Compact copies of the GEMM weights for decoding (`palmcore.load(run, weights=...)`). A decode
// step's products have a few rows, so each reads every weight once: their time is the bytes they
// read, and a weight stored in fewer bytes is read faster. The formats, for a weight w:
//   BF16  w' = round_bf16(w)                                                      2 bytes
//   Q8    per block of kQ8Block consecutive weights along the reduction axis k of one output:
//         s = max|w| / 127 (float32), q = round(w / s) in [-127, 127] (ties to even), w' = q · s
//         (ggml's Q8_0 layout of blocks, with the scale in float32)               1.125 bytes
// Activations and sums stay float32 (weight-only formats): matmul_compact computes exactly the
// float32 product with w' in place of w, the same bits as few_rows_gemm over a float32 copy of w'.
#pragma once

#include "palmcore/tensor.h"

namespace palmcore {

enum class WeightFormat { F32, BF16, Q8 };
constexpr int64_t kQ8Block = 32;
constexpr int64_t kCompactMaxRows = 64;  // the most rows matmul_compact takes (a decode step's)
const char* weight_format_name(WeightFormat format);

struct CompactWeight {
  WeightFormat format = WeightFormat::F32;
  bool transposed = false;  // stored [n, k] (C = A Wᵀ: the tied embedding's logits) or [k, n] (C = A W)
  Tensor values;            // bfloat16 or int8, W's shape
  Tensor scales;            // Q8: float32, one per block: [ceil(k / 32), n], or [n, ceil(k / 32)] transposed
  int64_t k() const { return transposed ? values.dim(1) : values.dim(0); }
  int64_t n() const { return transposed ? values.dim(0) : values.dim(1); }
};

// The compact form (BF16 or Q8) of the float32 2-D weight w, host tensors, and w' written into
// `dequantized` (float32, w's shape; may be w itself). `transposed` as in CompactWeight.
CompactWeight make_compact_weight(const Tensor& w, WeightFormat format, bool transposed, Tensor& dequantized);

// C[m, n] = alpha · A[m, k] @ op(W') + beta · C for m <= kCompactMaxRows rows (a decode step), on the CPU.
void matmul_compact(const Tensor& a, const CompactWeight& w, Tensor& c, float alpha = 1.0f, float beta = 0.0f);

}  // namespace palmcore
