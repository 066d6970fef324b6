#include "palmcore/optimizer.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>


namespace palmcore {

Optimizer::Optimizer(Model& model, OptimizerKind kind, const AdafactorSettings& adafactor,
                     const AdamWSettings& adamw, std::shared_ptr<Communicator> data_comm)
    : model_(model), data_comm_(data_comm ? std::move(data_comm) : make_single_rank_communicator()),
      kind_(kind), adafactor_(adafactor), adamw_(adamw) {
  const Tensor& params = model.flat_params();
  const int64_t n = params.numel(), ranks = data_comm_->size();
  if (!data_comm_->serves(params.device()))
    throw std::invalid_argument("the data axis communicator (" + data_comm_->name() + ") cannot work on a " +
                                device_name(params.device()) + " model: CUDA models need NCCL communicators, CPU "
                                "models MPI ones (palmcore.Mesh(..., device=...))");
  share_ = (n + ranks - 1) / ranks;
  begin_ = std::min(n, data_comm_->rank() * share_);
  end_ = std::min(n, begin_ + share_);
  m_ = Tensor::zeros({share_}, DType::F32, params.device());
  sums_ = Tensor::zeros({2 * static_cast<int64_t>(model.params_info().size())}, DType::F64, params.device());
  v_ = Tensor::zeros({share_}, DType::F32, params.device());
  if (ranks > 1) {
    grad_share_ = Tensor::zeros({share_}, DType::F32, params.device());
    padded_ = Tensor::zeros({ranks * share_}, DType::F32, params.device());
  }
}

std::pair<int64_t, int64_t> Optimizer::mine(int64_t offset, int64_t count) const {
  const int64_t a = std::clamp(offset, begin_, end_), b = std::clamp(offset + count, begin_, end_);
  return {a, b};
}

double Optimizer::step(double lr, double max_grad_norm, double grad_scale) {
  if (!(lr >= 0) || !std::isfinite(lr)) throw std::invalid_argument("lr must be finite and >= 0");
  if (!(grad_scale > 0) || !std::isfinite(grad_scale))
    throw std::invalid_argument("grad_scale must be finite and > 0");
  const bool data_parallel = data_comm_->size() > 1, sharded = model_.shard().size > 1;
  Tensor& grads = model_.flat_grads();
  Tensor& params = model_.flat_params();
  const int64_t n = grads.numel();
  // g of this rank's share, summed over the data axis
  Tensor g_share = grads.view(begin_, {end_ - begin_});
  if (data_parallel) {
    Tensor head = padded_.view(0, {n}), tail = padded_.view(n, {padded_.numel() - n});
    copy(grads, head);
    fill_zero(tail);
    data_comm_->reduce_scatter_sum(padded_, grad_share_);
    g_share = grad_share_.view(0, {end_ - begin_});
  }
  const std::vector<ParamInfo>& info = model_.params_info();
  // The bf16 mode's GEMM copy of the parameters, written by the update in the same pass; on a
  // data axis, refreshed after the all-gather instead (other ranks update the other shares).
  Tensor* const rounded = data_parallel ? nullptr : model_.rounded_params();
  // Every tensor's piece in this share: x, g, m, v, and x's place in the rounded copy (empty
  // where the tensor lies elsewhere).
  struct Piece {
    Tensor x, g, m, v, rounded;
  };
  std::vector<Piece> pieces;
  for (const ParamInfo& p : info) {
    const auto [a, b] = mine(p.offset, p.numel());
    pieces.push_back({params.view(a, {b - a}), g_share.view(a - begin_, {b - a}), m_.view(a - begin_, {b - a}),
                      v_.view(a - begin_, {b - a}), rounded ? rounded->view(a, {b - a}) : Tensor()});
  }
  // Whole-tensor sums: over the data axis (shares), then the split tensors over the model axis.
  // (on the host: staged through a tensor where the communicators work, params' device)
  auto all_reduce_doubles = [&](Communicator& comm, std::vector<double>& v) {
    Tensor host = Tensor::borrow(v.data(), {static_cast<int64_t>(v.size())}, DType::F64);
    Tensor there = host.to(params.device());
    comm.all_reduce_sum(there);
    if (there.raw_data() != host.raw_data()) copy(there, host);
  };
  auto sum_over_mesh = [&](std::vector<double>& per_tensor, int per) {
    if (data_parallel) all_reduce_doubles(*data_comm_, per_tensor);
    if (!sharded) return;
    std::vector<double> split;
    for (size_t i = 0; i < info.size(); ++i)
      if (info[i].split_axis >= 0) split.insert(split.end(), per_tensor.begin() + per * i, per_tensor.begin() + per * (i + 1));
    all_reduce_doubles(model_.model_comm(), split);
    for (size_t i = 0, j = 0; i < info.size(); ++i)
      if (info[i].split_axis >= 0)
        for (int k = 0; k < per; ++k) per_tensor[per * i + k] = split[j++];
  };

  // The sums are written on the device and read back once per pass (read_sums).
  auto read_sums = [&](int64_t count) {
    const Tensor host = sums_.view(0, {count}).to(Device::CPU);
    return std::vector<double>(host.host_data<double>(), host.host_data<double>() + count);
  };
  double squares = 0.0;
  if (!data_parallel && !sharded) {
    sum_squares(g_share, sums_, 0);  // one pass; the same bits as ever on one rank
    squares = read_sums(1)[0];
  } else {
    fill_zero(sums_);
    for (size_t i = 0; i < info.size(); ++i)
      if (pieces[i].g.numel()) sum_squares(pieces[i].g, sums_, static_cast<int64_t>(i));
    std::vector<double> per_tensor = read_sums(static_cast<int64_t>(info.size()));
    sum_over_mesh(per_tensor, 1);
    for (double s : per_tensor) squares += s;
  }
  const double norm = grad_scale * std::sqrt(squares);
  if (!std::isfinite(norm))
    throw NonFiniteStep("the gradient norm is not finite (" + std::to_string(norm) +
                             "); no update was made");
  const double scale = grad_scale * (max_grad_norm > 0 && norm > max_grad_norm ? max_grad_norm / norm : 1.0);
  ++steps_;
  if (kind_ == OptimizerKind::AdamW) {
    for (Piece& p : pieces)
      if (p.x.numel()) adamw_update(p.x, p.g, p.m, p.v, steps_, lr, scale, adamw_, rounded ? &p.rounded : nullptr);
  } else {
    // Adafactor: pass 1 on every piece, (Σu², Σx²) of whole tensors, then pass 2.
    fill_zero(sums_);
    for (size_t i = 0; i < info.size(); ++i)
      if (pieces[i].x.numel())
        adafactor_second_moment(pieces[i].x, pieces[i].g, pieces[i].v, steps_, scale, adafactor_, sums_,
                                2 * static_cast<int64_t>(i));
    std::vector<double> sums = read_sums(2 * static_cast<int64_t>(info.size()));
    sum_over_mesh(sums, 2);
    for (size_t i = 0; i < info.size(); ++i) {
      if (!pieces[i].x.numel()) continue;
      const double count = static_cast<double>(info[i].full_numel());
      adafactor_apply(pieces[i].x, pieces[i].g, pieces[i].m, pieces[i].v, lr, scale, std::sqrt(sums[2 * i] / count),
                      std::sqrt(sums[2 * i + 1] / count), adafactor_, rounded ? &pieces[i].rounded : nullptr);
    }
  }
  if (data_parallel) {  // every rank's updated share, back to every rank
    Tensor updated = grad_share_.view(0, {end_ - begin_});
    copy(params.view(begin_, {end_ - begin_}), updated);
    data_comm_->all_gather(grad_share_, padded_);
    copy(padded_.view(0, {n}), params);
  }
  if (!rounded) model_.params_changed();  // fp32: nothing; a data axis: the copy from the gathered weights
  // An update that overflowed (a learning rate far too large) must not pass for a step: the
  // caller rolls back to a checkpoint instead of saving infinite weights.
  sum_squares(params, sums_, 0);
  if (!std::isfinite(read_sums(1)[0]))
    throw NonFiniteStep("the update made a parameter non-finite (NaN or Inf): the learning rate is too large");
  return norm;
}

void Optimizer::gather_moment(int which, float* flat) const {
  const Tensor& moment = which == 1 ? m_ : v_;
  const int64_t n = model_.flat_params().numel();
  if (data_comm_->size() == 1) {  // from wherever the moments live
    Tensor host = Tensor::borrow(flat, {n}, DType::F32);
    copy(moment.view(0, {n}), host);
    return;
  }
  Tensor all = Tensor::zeros({data_comm_->size() * share_}, DType::F32, moment.device());
  data_comm_->all_gather(moment, all);
  Tensor host = Tensor::borrow(flat, {n}, DType::F32);
  copy(all.view(0, {n}), host);
}

void Optimizer::scatter_moment(int which, const float* flat) {
  Tensor& moment = which == 1 ? m_ : v_;
  Tensor dst = moment.view(0, {end_ - begin_});
  copy(Tensor::borrow(const_cast<float*>(flat + begin_), {end_ - begin_}, DType::F32), dst);
}

}  // namespace palmcore
