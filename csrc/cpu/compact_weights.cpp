// The compact forms of a weight (palmcore/compact_weights.h):
//   BF16  w' = round_bf16(w)
//   Q8    per block of 32 along k: s = max|w| / 127, q = round(w / s) (ties to even, in
//         [-127, 127]; an all-zero block has s = 0, q = 0), w' = q · s
// All in float32 arithmetic, so w' is what few_rows_gemm_compact's widening computes.
#include <algorithm>
#include <cmath>

#include "cpu/cpu_ops.h"
#include "palmcore/math/bf16.h"

namespace palmcore::cpu {
namespace {

// One block's scale and quantized values: w[i · stride] for i < count.
void quantize_block(const float* w, int64_t stride, int64_t count, int8_t* q, float* dequantized, float& scale) {
  float amax = 0.0f;
  for (int64_t i = 0; i < count; ++i) amax = std::max(amax, std::fabs(w[i * stride]));
  scale = amax / 127.0f;
  for (int64_t i = 0; i < count; ++i) {
    const float r = scale == 0.0f ? 0.0f : std::clamp(std::nearbyint(w[i * stride] / scale), -127.0f, 127.0f);
    q[i * stride] = static_cast<int8_t>(r);
    dequantized[i * stride] = r * scale;
  }
}

}  // namespace

void make_compact_weight(const Tensor& w, CompactWeight& compact, Tensor& dequantized) {
  const int64_t rows = w.dim(0), cols = w.dim(1), numel = w.numel();
  const float* src = w.data<float>();
  float* out = dequantized.data<float>();
  if (compact.format == WeightFormat::BF16) {
    bf16* values = compact.values.data<bf16>();
#pragma omp parallel for schedule(static) if (numel >= kParallelMinElements)
    for (int64_t i = 0; i < numel; ++i) {
      values[i] = to_bf16(src[i]);
      out[i] = from_bf16(values[i]);
    }
    return;
  }
  int8_t* q = compact.values.data<int8_t>();
  float* scales = compact.scales.data<float>();
  const int64_t lds = compact.scales.dim(1);
  if (compact.transposed) {  // [n, k]: blocks along each row
    const int64_t blocks = lds;
#pragma omp parallel for schedule(static) if (numel >= kParallelMinElements)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t first = r * cols + b * kQ8Block, count = std::min(kQ8Block, cols - b * kQ8Block);
        quantize_block(src + first, 1, count, q + first, out + first, scales[r * lds + b]);
      }
    return;
  }
  const int64_t blocks = compact.scales.dim(0);  // [k, n]: blocks down each column
#pragma omp parallel for schedule(static) if (numel >= kParallelMinElements)
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t first = b * kQ8Block * cols + c, count = std::min(kQ8Block, rows - b * kQ8Block);
      quantize_block(src + first, cols, count, q + first, out + first, scales[b * lds + c]);
    }
}

}  // namespace palmcore::cpu
