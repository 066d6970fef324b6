#include "palmcore/optimizer.h"

#include <cmath>
#include <stdexcept>
#include <string>

#include "palmcore/threads.h"

namespace palmcore {

Optimizer::Optimizer(Model& model, OptimizerKind kind, const AdafactorSettings& adafactor,
                     const AdamWSettings& adamw)
    : model_(model), kind_(kind), adafactor_(adafactor), adamw_(adamw) {
  const Tensor& params = model.flat_params();
  m_ = Tensor::zeros(params.shape(), DType::F32, params.device());
  v_ = Tensor::zeros(params.shape(), DType::F32, params.device());
}

double Optimizer::step(double lr, double max_grad_norm, double grad_scale) {
  if (!(lr >= 0) || !std::isfinite(lr)) throw std::invalid_argument("lr must be finite and >= 0");
  if (!(grad_scale > 0) || !std::isfinite(grad_scale))
    throw std::invalid_argument("grad_scale must be finite and > 0");
  apply_num_threads();
  const double norm = grad_scale * std::sqrt(sum_squares(model_.flat_grads()));
  if (!std::isfinite(norm))
    throw std::runtime_error("the gradient norm is not finite (" + std::to_string(norm) +
                             "); no update was made");
  const double scale = grad_scale * (max_grad_norm > 0 && norm > max_grad_norm ? max_grad_norm / norm : 1.0);
  ++steps_;
  for (const ParamInfo& p : model_.params_info()) {
    Tensor x = model_.flat_params().view(p.offset, p.shape);
    Tensor g = model_.flat_grads().view(p.offset, p.shape);
    Tensor m = m_.view(p.offset, p.shape), v = v_.view(p.offset, p.shape);
    if (kind_ == OptimizerKind::Adafactor)
      adafactor_update(x, g, m, v, steps_, lr, scale, adafactor_);
    else
      adamw_update(x, g, m, v, steps_, lr, scale, adamw_);
  }
  return norm;
}

}  // namespace palmcore
