// The checked entry points of palmcore/compact_weights.h (CPU tensors only: the compact decode
// weights are a CPU feature; a GPU reads bf16 weights through cuBLASLt instead).
#include "palmcore/compact_weights.h"

#include <cmath>
#include <stdexcept>
#include <string>

#include "cpu/cpu_ops.h"
#include "palmcore/threads.h"

namespace palmcore {

static_assert(kCompactMaxRows == cpu::kFewRowsMax, "matmul_compact runs few_rows_gemm's blocks");

const char* weight_format_name(WeightFormat format) {
  switch (format) {
    case WeightFormat::F32: return "fp32";
    case WeightFormat::BF16: return "bf16";
    case WeightFormat::Q8: return "int8";
  }
  return "?";
}

CompactWeight make_compact_weight(const Tensor& w, WeightFormat format, bool transposed, Tensor& dequantized) {
  if (format == WeightFormat::F32) throw std::invalid_argument("make_compact_weight: fp32 is not a compact format");
  if (w.device() != Device::CPU || dequantized.device() != Device::CPU)
    throw std::invalid_argument("compact weights are made on the CPU");
  if (w.dtype() != DType::F32 || w.ndim() != 2 || dequantized.dtype() != DType::F32 || dequantized.shape() != w.shape())
    throw std::invalid_argument("make_compact_weight: a float32 2-D weight and a float32 output of its shape, got " +
                                w.shape_string() + " " + dtype_name(w.dtype()) + " and " +
                                dequantized.shape_string() + " " + dtype_name(dequantized.dtype()));
  const float* v = w.data<float>();
  for (int64_t i = 0; i < w.numel(); ++i)
    if (!std::isfinite(v[i]))
      throw std::invalid_argument("make_compact_weight: the weight holds a non-finite value at flat index " +
                                  std::to_string(i));
  CompactWeight compact;
  compact.format = format;
  compact.transposed = transposed;
  compact.values = Tensor::zeros(w.shape(), format == WeightFormat::BF16 ? DType::BF16 : DType::I8);
  if (format == WeightFormat::Q8) {
    const int64_t k = transposed ? w.dim(1) : w.dim(0), n = transposed ? w.dim(0) : w.dim(1);
    const int64_t blocks = (k + kQ8Block - 1) / kQ8Block;
    compact.scales = Tensor::zeros(transposed ? std::vector<int64_t>{n, blocks} : std::vector<int64_t>{blocks, n});
  }
  apply_num_threads();
  cpu::make_compact_weight(w, compact, dequantized);
  return compact;
}

void matmul_compact(const Tensor& a, const CompactWeight& w, Tensor& c, float alpha, float beta) {
  if (w.format == WeightFormat::F32 || !w.values.defined())
    throw std::invalid_argument("matmul_compact: the weight has no compact form");
  if (a.device() != Device::CPU || c.device() != Device::CPU)
    throw std::invalid_argument("matmul_compact: compact weights are read on the CPU");
  if (a.dtype() != DType::F32 || c.dtype() != DType::F32 || a.ndim() != 2 || c.ndim() != 2 || a.dim(1) != w.k() ||
      c.dim(0) != a.dim(0) || c.dim(1) != w.n())
    throw std::invalid_argument("matmul_compact: float32 shapes " + a.shape_string() + " x [" + std::to_string(w.k()) +
                                ", " + std::to_string(w.n()) + "] -> " + c.shape_string() + " do not agree");
  if (a.dim(0) > kCompactMaxRows)
    throw std::invalid_argument("matmul_compact: at most " + std::to_string(kCompactMaxRows) + " rows, got " +
                                std::to_string(a.dim(0)));
  apply_num_threads();
  cpu::matmul_compact(a, w, c, alpha, beta);
}

}  // namespace palmcore
