#include "palmcore/optimizer.h"

#include <array>
#include <cmath>
#include <tuple>
#include <vector>
#include <stdexcept>
#include <string>

#include "palmcore/threads.h"

namespace palmcore {

Optimizer::Optimizer(Model& model, OptimizerKind kind, const AdafactorSettings& adafactor,
                     const AdamWSettings& adamw, std::shared_ptr<Communicator> data_comm)
    : model_(model), data_comm_(data_comm ? std::move(data_comm) : make_single_rank_communicator()),
      kind_(kind), adafactor_(adafactor), adamw_(adamw) {
  const Tensor& params = model.flat_params();
  m_ = Tensor::zeros(params.shape(), DType::F32, params.device());
  v_ = Tensor::zeros(params.shape(), DType::F32, params.device());
}

double Optimizer::step(double lr, double max_grad_norm, double grad_scale) {
  if (!(lr >= 0) || !std::isfinite(lr)) throw std::invalid_argument("lr must be finite and >= 0");
  if (!(grad_scale > 0) || !std::isfinite(grad_scale))
    throw std::invalid_argument("grad_scale must be finite and > 0");
  apply_num_threads();
  Tensor& grads = model_.flat_grads();
  if (data_comm_->size() > 1) data_comm_->all_reduce_sum(grads.data<float>(), grads.numel());
  const std::vector<ParamInfo>& params = model_.params_info();
  const bool sharded = model_.shard().size > 1;
  // ‖g‖²: the split tensors' pieces summed over the model axis, the replicated ones once.
  double squares[2] = {0.0, 0.0};  // split, replicated
  if (!sharded) {
    squares[1] = sum_squares(grads);
  } else {
    for (const ParamInfo& p : params) squares[p.split_axis < 0] += sum_squares(grads.view(p.offset, p.shape));
    model_.model_comm().all_reduce_sum(squares, 1);
  }
  const double norm = grad_scale * std::sqrt(squares[0] + squares[1]);
  if (!std::isfinite(norm))
    throw std::runtime_error("the gradient norm is not finite (" + std::to_string(norm) +
                             "); no update was made");
  const double scale = grad_scale * (max_grad_norm > 0 && norm > max_grad_norm ? max_grad_norm / norm : 1.0);
  ++steps_;
  auto views = [&](const ParamInfo& p) {
    return std::array<Tensor, 4>{model_.flat_params().view(p.offset, p.shape), grads.view(p.offset, p.shape),
                                 m_.view(p.offset, p.shape), v_.view(p.offset, p.shape)};
  };
  if (kind_ == OptimizerKind::AdamW) {
    for (const ParamInfo& p : params) {
      auto [x, g, m, v] = views(p);
      adamw_update(x, g, m, v, steps_, lr, scale, adamw_);
    }
    return norm;
  }
  // Adafactor: pass 1 on every tensor, the split tensors' (Σu², Σx²) summed over the model
  // axis in one call, then pass 2 with the whole tensors' RMS terms.
  std::vector<double> sums(2 * params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    auto [x, g, m, v] = views(params[i]);
    std::tie(sums[2 * i], sums[2 * i + 1]) = adafactor_second_moment(x, g, v, steps_, scale, adafactor_);
  }
  if (sharded) {
    std::vector<double> split;
    for (size_t i = 0; i < params.size(); ++i)
      if (params[i].split_axis >= 0) split.insert(split.end(), {sums[2 * i], sums[2 * i + 1]});
    model_.model_comm().all_reduce_sum(split.data(), static_cast<int64_t>(split.size()));
    for (size_t i = 0, j = 0; i < params.size(); ++i)
      if (params[i].split_axis >= 0) {
        sums[2 * i] = split[j++];
        sums[2 * i + 1] = split[j++];
      }
  }
  for (size_t i = 0; i < params.size(); ++i) {
    auto [x, g, m, v] = views(params[i]);
    const double n = static_cast<double>(params[i].full_numel());
    adafactor_apply(x, g, m, v, lr, scale, std::sqrt(sums[2 * i] / n), std::sqrt(sums[2 * i + 1] / n), adafactor_);
  }
  return norm;
}

}  // namespace palmcore
