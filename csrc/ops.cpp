// One dispatch per op: the device of the op's first tensor picks the backend's kernel.
// PALMCORE_DISPATCH for the ops both backends have, PALMCORE_DISPATCH_CPU_ONLY for those whose
// CUDA kernel is not written yet (they say so on a CUDA tensor rather than run anything).
#include "palmcore/ops.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "cpu/cpu_ops.h"
#ifdef PALMCORE_CUDA
#include "cuda/cuda_ops.h"
#define PALMCORE_CUDA_KERNEL(op, ...) return cuda::op(__VA_ARGS__)
#else
#define PALMCORE_CUDA_KERNEL(op, ...) \
  throw std::runtime_error(#op ": palmcore was built without CUDA (PALMCORE_CUDA=OFF, or no nvcc found when it was built)")
#endif

namespace palmcore {

#define PALMCORE_DISPATCH(op, device, ...)                               \
  switch (device) {                                                      \
    case Device::CPU:                                                    \
      return cpu::op(__VA_ARGS__);                                       \
    case Device::CUDA:                                                   \
      PALMCORE_CUDA_KERNEL(op, __VA_ARGS__);                             \
  }                                                                      \
  throw std::logic_error(#op ": unknown device")

#define PALMCORE_DISPATCH_CPU_ONLY(op, device, ...)                      \
  switch (device) {                                                      \
    case Device::CPU:                                                    \
      return cpu::op(__VA_ARGS__);                                       \
    case Device::CUDA:                                                   \
      throw std::runtime_error("no CUDA kernel yet for " #op);           \
  }                                                                      \
  throw std::logic_error(#op ": unknown device")

void copy(const Tensor& src, Tensor& dst) {
  if (src.shape() != dst.shape())
    throw std::invalid_argument("copy: source " + src.shape_string() + " and destination " + dst.shape_string() +
                                " differ in shape");
  const bool converts = src.dtype() != dst.dtype();
  const bool f32_bf16 = (src.dtype() == DType::F32 || src.dtype() == DType::BF16) &&
                        (dst.dtype() == DType::F32 || dst.dtype() == DType::BF16);
  if (converts && !f32_bf16)
    throw std::invalid_argument(std::string("copy: no conversion from ") + dtype_name(src.dtype()) + " to " +
                                dtype_name(dst.dtype()));
  // a copy that touches a device runs on that device's backend
  const Device device = src.device() == Device::CPU ? dst.device() : src.device();
  PALMCORE_DISPATCH(copy, device, src, dst);
}

void fill_zero(Tensor& x) { PALMCORE_DISPATCH(fill_zero, x.device(), x); }

void round_bf16(Tensor& x) { PALMCORE_DISPATCH(round_bf16, x.device(), x); }

void matmul(const Tensor& a, bool transpose_a, const Tensor& b, bool transpose_b, Tensor& c,
            float alpha, float beta) {
  if (a.device() != c.device() || b.device() != c.device())
    throw std::invalid_argument(std::string("matmul: operands on ") + device_name(a.device()) + ", " +
                                device_name(b.device()) + " and " + device_name(c.device()) + " (one device, please)");
  const bool inputs_ok = a.dtype() == b.dtype() && (a.dtype() == DType::F32 || a.dtype() == DType::BF16);
  if (!inputs_ok || c.dtype() != DType::F32)
    throw std::invalid_argument(std::string("matmul: A, B, C of ") + dtype_name(a.dtype()) + ", " +
                                dtype_name(b.dtype()) + ", " + dtype_name(c.dtype()) +
                                "; A and B must both be float32 or both bfloat16, C float32");
  const int64_t m = transpose_a ? a.dim(1) : a.dim(0), k = transpose_a ? a.dim(0) : a.dim(1);
  const int64_t kb = transpose_b ? b.dim(1) : b.dim(0), n = transpose_b ? b.dim(0) : b.dim(1);
  if (a.ndim() != 2 || b.ndim() != 2 || c.ndim() != 2 || k != kb || c.dim(0) != m || c.dim(1) != n)
    throw std::invalid_argument("matmul: shapes " + a.shape_string() + " x " + b.shape_string() + " -> " +
                                c.shape_string() + " do not agree");
  PALMCORE_DISPATCH(matmul, c.device(), a, transpose_a, b, transpose_b, c, alpha, beta);
}

void embedding_forward(const Tensor& table, const Tensor& tokens, Tensor& out, int64_t first) {
  PALMCORE_DISPATCH_CPU_ONLY(embedding_forward, out.device(), table, tokens, out, first);
}

void embedding_backward(const Tensor& dout, const Tensor& tokens, Tensor& dtable, int64_t first) {
  PALMCORE_DISPATCH_CPU_ONLY(embedding_backward, dtable.device(), dout, tokens, dtable, first);
}

void add_to(Tensor& x, const Tensor& y) { PALMCORE_DISPATCH_CPU_ONLY(add_to, x.device(), x, y); }

void layernorm_forward(const Tensor& x, const Tensor& scale, float eps, Tensor& out, Tensor& xhat,
                       Tensor& rstd) {
  PALMCORE_DISPATCH_CPU_ONLY(layernorm_forward, x.device(), x, scale, eps, out, xhat, rstd);
}

void layernorm_backward(const Tensor& dout, const Tensor& xhat, const Tensor& rstd,
                        const Tensor& scale, Tensor& dx, Tensor& dscale) {
  PALMCORE_DISPATCH_CPU_ONLY(layernorm_backward, dx.device(), dout, xhat, rstd, scale, dx, dscale);
}

void rope_apply(Tensor& x, const Tensor& positions, const Tensor& cos_table,
                const Tensor& sin_table, int64_t heads, bool inverse) {
  PALMCORE_DISPATCH_CPU_ONLY(rope_apply, x.device(), x, positions, cos_table, sin_table, heads, inverse);
}

AttentionWorkspace AttentionWorkspace::create(const AttentionShape& s, int64_t workers, Device device,
                                              bool for_backward) {
  AttentionWorkspace ws;
  const int64_t tile_rows = std::max(kAttentionQueryBlock, s.heads / s.kv_heads);
  ws.tiles = Tensor::zeros({workers, 2, tile_rows, s.seq}, DType::F32, device);
  if (for_backward) {
    ws.dkeys_part = Tensor::zeros({s.batch * s.heads, s.seq, s.head_dim}, DType::F32, device);
    ws.dvalues_part = Tensor::zeros({s.batch * s.heads, s.seq, s.head_dim}, DType::F32, device);
  }
  return ws;
}

void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out, Tensor& lse,
                       const AttentionShape& shape, AttentionWorkspace& ws) {
  PALMCORE_DISPATCH_CPU_ONLY(attention_forward, q.device(), q, k, v, out, lse, shape, ws);
}

void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                        const Tensor& lse, const Tensor& dout, Tensor& dq, Tensor& dk, Tensor& dv,
                        const AttentionShape& shape, AttentionWorkspace& ws) {
  PALMCORE_DISPATCH_CPU_ONLY(attention_backward, q.device(), q, k, v, out, lse, dout, dq, dk, dv, shape, ws);
}

void attention_cached(const Tensor& q, const Tensor& slots, const Tensor& positions, const Tensor& k_cache,
                      const Tensor& v_cache, Tensor& out, const AttentionShape& shape, AttentionWorkspace& ws) {
  PALMCORE_DISPATCH_CPU_ONLY(attention_cached, q.device(), q, slots, positions, k_cache, v_cache, out, shape, ws);
}

void kv_cache_write(const Tensor& k, const Tensor& v, const Tensor& slots, const Tensor& positions,
                    Tensor& k_cache, Tensor& v_cache, int64_t capacity) {
  PALMCORE_DISPATCH_CPU_ONLY(kv_cache_write, k_cache.device(), k, v, slots, positions, k_cache, v_cache, capacity);
}

void swiglu_forward(const Tensor& gate, const Tensor& up, Tensor& out) {
  PALMCORE_DISPATCH_CPU_ONLY(swiglu_forward, out.device(), gate, up, out);
}

void swiglu_backward(const Tensor& gate, const Tensor& up, const Tensor& dout, Tensor& dgate,
                     Tensor& dup) {
  PALMCORE_DISPATCH_CPU_ONLY(swiglu_backward, dgate.device(), gate, up, dout, dgate, dup);
}

void cross_entropy_stats(const Tensor& logits, const Tensor& targets, int64_t first, Tensor& lse,
                         Tensor& picked) {
  PALMCORE_DISPATCH_CPU_ONLY(cross_entropy_stats, logits.device(), logits, targets, first, lse, picked);
}

void cross_entropy_backward(Tensor& logits, const Tensor& targets, int64_t first, const Tensor& lse,
                            float z_loss, float grad_scale) {
  PALMCORE_DISPATCH_CPU_ONLY(cross_entropy_backward, logits.device(), logits, targets, first, lse, z_loss, grad_scale);
}

void cross_entropy_sums(const Tensor& lse, const Tensor& picked, const Tensor& targets, double z_loss,
                        Tensor& sums) {
  PALMCORE_DISPATCH_CPU_ONLY(cross_entropy_sums, sums.device(), lse, picked, targets, z_loss, sums);
}

double sum_squares(const Tensor& x) { PALMCORE_DISPATCH_CPU_ONLY(sum_squares, x.device(), x); }

std::pair<double, double> adafactor_second_moment(const Tensor& x, const Tensor& g, Tensor& v, int64_t step,
                                                  double grad_scale, const AdafactorSettings& settings) {
  PALMCORE_DISPATCH_CPU_ONLY(adafactor_second_moment, x.device(), x, g, v, step, grad_scale, settings);
}

void adafactor_apply(Tensor& x, const Tensor& g, Tensor& m, const Tensor& v, double lr, double grad_scale,
                     double rms_u, double rms_x, const AdafactorSettings& settings) {
  PALMCORE_DISPATCH_CPU_ONLY(adafactor_apply, x.device(), x, g, m, v, lr, grad_scale, rms_u, rms_x, settings);
}

void adamw_update(Tensor& x, const Tensor& g, Tensor& m, Tensor& v, int64_t step, double lr,
                  double grad_scale, const AdamWSettings& settings) {
  PALMCORE_DISPATCH_CPU_ONLY(adamw_update, x.device(), x, g, m, v, step, lr, grad_scale, settings);
}

}  // namespace palmcore
