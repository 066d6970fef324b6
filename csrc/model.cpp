// The PaLM graph (PALM_SPEC.md "Forward pass", "Loss"), forward and backward, over the ops.
// It knows no backend: every computation is an op call on tensors.
#include "palmcore/model.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <unordered_map>

#include "palmcore/math/rope.h"
#include "palmcore/memory.h"
#include "palmcore/random.h"
#include "palmcore/threads.h"

namespace palmcore {

namespace {

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

// Rows of the logits computed at once in the loss: ~64 MiB of [rows, V] floats on the CPU (it
// stays in cache-friendly pieces), ~1 GiB on a GPU (the classifier's three GEMMs then have
// thousands of rows: a chunk of 64 rows against a 256k vocabulary would read the whole
// embedding per 64 rows); at least 64 rows when V is so large that the budget holds fewer.
int64_t logits_chunk_rows(int64_t vocab, int64_t rows, Device device) {
  const int64_t budget = device == Device::CPU ? int64_t{16} << 20 : int64_t{256} << 20;  // floats
  return std::min(rows, std::max<int64_t>(64, budget / vocab));
}

// Parameters one rank of `shards` holds (PALM_SPEC "Sharded layout"), counted from the config
// in time independent of n_layers. ModelConfig::validate() has bounded the whole count below
// 2^48, so no product here overflows.
int64_t local_param_count(const ModelConfig& c, int64_t shards) {
  const int64_t D = c.d_model, q = c.n_heads * c.head_dim / shards, kv = c.n_kv_heads * c.head_dim;
  const int64_t F = c.ffn_dim / shards;
  // A layer: norm (D), wq and wo (D·q each), wk and wv (D·kv each), then a dense MLP: w_gate,
  // w_up, w_down (D·F each), or a sparse one: the router (D·E) and this rank's experts (3·D·Fe each).
  const int64_t attention = D * (1 + 2 * q + 2 * kv), sparse = c.sparse_layers();
  const int64_t sparse_mlp = D * c.n_experts + c.n_experts / shards * 3 * D * c.expert_ffn_dim;
  return c.n_layers * attention + (c.n_layers - sparse) * 3 * D * F + sparse * sparse_mlp + c.vocab_size / shards * D +
         D;  // + the embedding, the final norm
}

}  // namespace

void ModelConfig::validate() const {
  const std::pair<const char*, int64_t> positive[] = {
      {"vocab_size", vocab_size}, {"d_model", d_model}, {"n_layers", n_layers},
      {"n_heads", n_heads},       {"n_kv_heads", n_kv_heads}, {"head_dim", head_dim},
      {"ffn_dim", ffn_dim},       {"max_seq_len", max_seq_len}};
  // Every extent is a 32-bit BLAS dimension, and the parameter count must be allocatable.
  for (const auto& [name, value] : positive) {
    require(value > 0, std::string(name) + " must be positive, got " + std::to_string(value));
    require(value <= INT32_MAX, std::string(name) + " must be below 2^31, got " + std::to_string(value));
  }
  require(n_experts >= 0 && n_experts <= 4096, "n_experts must be in [0, 4096], got " + std::to_string(n_experts));
  if (n_experts > 0) {
    require(expert_top_k >= 1 && expert_top_k <= n_experts, "expert_top_k (" + std::to_string(expert_top_k) +
                                                                ") must be in [1, n_experts = " +
                                                                std::to_string(n_experts) + "]");
    require(expert_ffn_dim > 0 && expert_ffn_dim <= INT32_MAX, "expert_ffn_dim must be positive, below 2^31");
    require(moe_every >= 1, "moe_every must be positive, got " + std::to_string(moe_every));
    require(router_aux_loss >= 0 && router_aux_loss <= 1e3 && router_z_loss >= 0 && router_z_loss <= 1e3,
            "router_aux_loss and router_z_loss must be in [0, 1e3]");
  }
  const long double attention = static_cast<long double>(d_model) * head_dim * (2 * n_heads + 2 * n_kv_heads) + d_model;
  const long double sparse = static_cast<long double>(sparse_layers());
  const long double mlp = (n_layers - sparse) * 3.0L * d_model * ffn_dim +
                          sparse * (static_cast<long double>(d_model) * n_experts +
                                    3.0L * n_experts * d_model * static_cast<long double>(expert_ffn_dim));
  const long double params = static_cast<long double>(vocab_size) * d_model + n_layers * attention + mlp + d_model;
  char count[32];
  std::snprintf(count, sizeof count, "%.3Le", params);
  require(params < 0x1p48L, std::string("the model has ") + count +
                                " parameters, more than this runtime can hold (2^48)");
  require(head_dim % 2 == 0, "head_dim must be even for RoPE, got " + std::to_string(head_dim));
  require(n_heads % n_kv_heads == 0, "n_heads (" + std::to_string(n_heads) +
                                         ") must be a multiple of n_kv_heads (" +
                                         std::to_string(n_kv_heads) + ")");
  require(rope_base > 0 && std::isfinite(rope_base), "rope_base must be positive and finite");
  // Both are used as float32: keep them where float32 represents them.
  require(norm_eps >= 1e-30 && norm_eps <= 1e3, "norm_eps must be positive and finite, in [1e-30, 1e3]");
  require(z_loss >= 0 && z_loss <= 1e3, "z_loss must be non-negative and finite, at most 1e3");
}

int64_t ParamInfo::numel() const {
  int64_t n = 1;
  for (int64_t extent : shape) n *= extent;
  return n;
}

int64_t ParamInfo::full_numel() const {
  int64_t n = 1;
  for (int64_t extent : full_shape) n *= extent;
  return n;
}

namespace {

// Parameter s of the full model, element g of its full flattened tensor, is init_std times
// the first (g even) or second (g odd) normal of draw (seed, s, g / 2): the same value on any
// shard layout and thread count. Fills this rank's piece, row by row of the full tensor seen
// as [rows, last extent] (a 3-D expert tensor split over its experts holds whole rows).
void init_normal(const ParamInfo& p, uint64_t seed, uint64_t s, float* w) {
  const int last = static_cast<int>(p.shape.size()) - 1;
  const int64_t cols = p.full_shape.back();
  const int64_t local_cols = p.split_axis == last ? p.shape.back() : cols;
  const int64_t local_rows = p.numel() / local_cols;
  // a split over the first axis of a 2-D or 3-D tensor starts at whole rows of [rows, cols]
  const int64_t row0 = p.split_axis == 0 && last > 0 ? p.split_offset * (local_rows / p.shape[0]) : 0;
  const int64_t col0 = p.split_axis == last ? p.split_offset : 0;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < local_rows; ++i) {
    const int64_t g0 = (row0 + i) * cols + col0;
    for (int64_t j = 0; j < local_cols; ++j) {
      const int64_t g = g0 + j;
      const auto [a, b] = standard_normal_pair(seed, s, static_cast<uint64_t>(g / 2));
      if (g % 2 == 0 && j + 1 < local_cols) {  // both halves of the pair are ours
        w[i * local_cols + j] = static_cast<float>(p.init_std * a);
        w[i * local_cols + ++j] = static_cast<float>(p.init_std * b);
      } else {
        w[i * local_cols + j] = static_cast<float>(p.init_std * (g % 2 == 0 ? a : b));
      }
    }
  }
}

}  // namespace

Model::Model(const ModelConfig& config, uint64_t seed, Device device, ModelShard shard)
    : config_(config), device_(device), shard_(std::move(shard)) {
  config_.validate();
  if (!shard_.comm) shard_.comm = make_single_rank_communicator();
  const int64_t M = shard_.size;
  require(M >= 1 && shard_.rank >= 0 && shard_.rank < M,
          "model shard " + std::to_string(shard_.rank) + " of " + std::to_string(M) + " does not exist");
  require(shard_.comm->size() == M && shard_.comm->rank() == shard_.rank,
          "the model axis communicator (" + shard_.comm->name() + ") does not match shard " +
              std::to_string(shard_.rank) + " of " + std::to_string(M));
  require(shard_.comm->serves(device_), "the model axis communicator (" + shard_.comm->name() + ") cannot work on a " +
                                           device_name(device_) + " model: CUDA models need NCCL communicators, CPU "
                                           "models MPI ones (palmcore.Mesh(..., device=...))");
  for (const auto& [name, extent] : {std::pair<const char*, int64_t>{"n_heads", config_.n_heads},
                                     {"ffn_dim", config_.ffn_dim}, {"vocab_size", config_.vocab_size},
                                     {"n_experts", config_.n_experts}})
    require(extent % M == 0, "the model axis (" + std::to_string(M) + ") must divide " + name + " (" +
                                 std::to_string(extent) + ")");
  // Refused before building anything as large as n_layers (info_ below, then the buffers).
  const int64_t local_params = local_param_count(config_, M);
  // On the CPU the parameters and gradients live in host memory; on a GPU the host only stages the
  // initial parameters (the device's own memory is checked as its buffers are allocated).
  const bool on_host = device == Device::CPU;
  const uint64_t param_bytes = static_cast<uint64_t>(local_params) * (on_host ? 2 : 1) * sizeof(float);
  require_memory("the model", param_bytes,
                 std::string(on_host ? "its parameters and gradients (" : "staging its parameters (") +
                     std::to_string(local_params) + " parameters" +
                     (M > 1 ? " on this rank of " + std::to_string(M) : "") + ", float32)");
  const int64_t V = config_.vocab_size, D = config_.d_model, F = config_.ffn_dim;
  const int64_t q_width = config_.n_heads * config_.head_dim;
  const int64_t kv_width = config_.n_kv_heads * config_.head_dim;
  int64_t offset = 0;
  // split_axis: 0 splits the rows, 1 the columns, -1 replicates (PALM_SPEC "Sharded layout").
  auto add = [&](std::string name, std::vector<int64_t> full_shape, double init_std, int split_axis) {
    std::vector<int64_t> shape = full_shape;
    int64_t split_offset = 0;
    if (split_axis >= 0) {
      shape[split_axis] /= M;
      split_offset = shard_.rank * shape[split_axis];
    }
    info_.push_back({std::move(name), std::move(shape), offset, init_std, std::move(full_shape), split_axis,
                     split_offset});
    offset += info_.back().numel();
  };
  // Spec order and init: embed ~ N(0, 1); dense kernels ~ N(0, 1/fan_in); norm scales = 1.
  add("embed", {V, D}, 1.0, 0);
  for (int64_t i = 0; i < config_.n_layers; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    add(p + "norm.scale", {D}, 0.0, -1);
    add(p + "attn.wq", {D, q_width}, 1.0 / std::sqrt(double(D)), 1);
    add(p + "attn.wk", {D, kv_width}, 1.0 / std::sqrt(double(D)), -1);
    add(p + "attn.wv", {D, kv_width}, 1.0 / std::sqrt(double(D)), -1);
    add(p + "attn.wo", {q_width, D}, 1.0 / std::sqrt(double(q_width)), 0);
    if (config_.sparse(i)) {  // experts split over the model axis, the router replicated
      const int64_t E = config_.n_experts, Fe = config_.expert_ffn_dim;
      add(p + "mlp.router", {D, E}, 1.0 / std::sqrt(double(D)), -1);
      add(p + "mlp.experts.w_gate", {E, D, Fe}, 1.0 / std::sqrt(double(D)), 0);
      add(p + "mlp.experts.w_up", {E, D, Fe}, 1.0 / std::sqrt(double(D)), 0);
      add(p + "mlp.experts.w_down", {E, Fe, D}, 1.0 / std::sqrt(double(Fe)), 0);
      continue;
    }
    add(p + "mlp.w_gate", {D, F}, 1.0 / std::sqrt(double(D)), 1);
    add(p + "mlp.w_up", {D, F}, 1.0 / std::sqrt(double(D)), 1);
    add(p + "mlp.w_down", {F, D}, 1.0 / std::sqrt(double(F)), 0);
  }
  add("final_norm.scale", {D}, 0.0, -1);
  if (offset != local_params) throw std::logic_error("local_param_count disagrees with the parameter layout");

  apply_num_threads();  // drawing the initial weights below runs in parallel on the host
  params_ = Tensor::zeros({offset}, DType::F32, device_);
  grads_ = Tensor::zeros({offset}, DType::F32, device_);
  Tensor initial = host_twin(params_);  // drawn on the host
  for (size_t s = 0; s < info_.size(); ++s) {
    const ParamInfo& p = info_[s];
    float* w = initial.host_data<float>() + p.offset;
    if (p.init_std == 0.0)
      std::fill(w, w + p.numel(), 1.0f);
    else
      init_normal(p, seed, s, w);
  }
  upload(initial, params_);
  weights_ = views_of(params_);
  weight_grads_ = views_of(grads_);
  gemm_params_ = params_;
  gemm_weights_ = weights_;

  make_rope_tables(config_.max_seq_len, config_.head_dim, config_.rope_base, rope_cos_, rope_sin_);
  rope_cos_ = rope_cos_.to(device_);
  rope_sin_ = rope_sin_.to(device_);
}

Tensor Model::host_twin(const Tensor& t) const {
  return t.device() == Device::CPU ? t : Tensor::zeros(t.shape(), t.dtype(), Device::CPU);
}

void Model::upload(const Tensor& host, Tensor& dst) const {
  if (host.raw_data() != dst.raw_data()) copy(host, dst);
}

// θ[p, i] = p · base^(-2i/dh), computed in double, stored as float cos and sin [positions, dh/2]
// (host tensors).
void make_rope_tables(int64_t positions, int64_t head_dim, double base, Tensor& cos_table, Tensor& sin_table) {
  const int64_t half = head_dim / 2;
  cos_table = Tensor::zeros({positions, half});
  sin_table = Tensor::zeros({positions, half});
  for (int64_t pos = 0; pos < positions; ++pos)
    for (int64_t i = 0; i < half; ++i) {
      const double theta = rope_angle(pos, i, head_dim, base);
      cos_table.host_data<float>()[pos * half + i] = static_cast<float>(std::cos(theta));
      sin_table.host_data<float>()[pos * half + i] = static_cast<float>(std::sin(theta));
    }
}

const ParamInfo& Model::info(const std::string& name) const {
  for (const ParamInfo& p : info_)
    if (p.name == name) return p;
  throw std::invalid_argument("no parameter named '" + name + "'");
}

Tensor Model::param(const std::string& name) const {
  const ParamInfo& p = info(name);
  return params_.view(p.offset, p.shape);
}

Tensor Model::grad(const std::string& name) const {
  const ParamInfo& p = info(name);
  return grads_.view(p.offset, p.shape);
}

void Model::set_precision(Precision precision, DType storage) {
  require(storage == DType::F32 || storage == DType::BF16, "the bf16 mode stores float32 or bfloat16");
  require(storage == DType::F32 || !sharded(),
          "bfloat16 storage on a sharded model is not supported (its collectives move float32)");
  require(precision == Precision::FP32 || weight_format_ == WeightFormat::F32,
          std::string("the bf16 mode computes with bf16 weights of its own: set the weight format (now ") +
              weight_format_name(weight_format_) + ") back to fp32 first");
  if (precision == precision_ && storage == storage_) return;
  gemm_params_ = precision == Precision::BF16 ? Tensor::zeros(params_.shape(), storage, device_) : params_;
  gemm_weights_ = views_of(gemm_params_);
  precision_ = precision;
  storage_ = storage;
  act_ = Activations{};  // sized again for this precision (bf16 keeps a rounded copy of dx)
  infer_ = Activations{};
  params_changed();
}

void Model::params_changed() {
  if (weight_format_ != WeightFormat::F32) return refresh_compact_weights();
  if (!bf16()) return;
  copy(params_, gemm_params_);
  round_bf16(gemm_params_);
}

void Model::param_changed(const std::string& name) {
  if (weight_format_ != WeightFormat::F32) return refresh_compact_weights(&name);
  if (!bf16()) return;
  const ParamInfo& p = info(name);
  Tensor copy_of = gemm_params_.view(p.offset, p.shape);
  copy(param(name), copy_of);
  round_bf16(copy_of);
}

void Model::set_weight_format(WeightFormat format) {
  if (format == weight_format_) return;
  require(format == WeightFormat::F32 || device_ == Device::CPU,
          "compact decode weights are a CPU feature (a GPU model computes with bf16 weights in its bf16 mode)");
  require(format == WeightFormat::F32 || !sharded(), "compact decode weights need an unsharded model");
  require(format == WeightFormat::F32 || !bf16(),
          "compact decode weights are weight-only, with float32 activations: set the precision to fp32 first");
  weight_format_ = format;
  compact_ = CompactWeights{};
  if (format == WeightFormat::F32) {
    gemm_params_ = params_;
    gemm_weights_ = weights_;
    return;
  }
  gemm_params_ = Tensor::zeros(params_.shape(), DType::F32, device_);
  gemm_weights_ = views_of(gemm_params_);
  refresh_compact_weights();
}

void Model::refresh_compact_weights(const std::string* name) {
  if (!name) {
    copy(params_, gemm_params_);  // norms, routers and experts: their float32 values
  } else {
    const ParamInfo& p = info(*name);
    Tensor copy_of = gemm_params_.view(p.offset, p.shape);
    copy(param(*name), copy_of);
  }
  const WeightFormat f = weight_format_;
  // the compact copy of parameter `spec` (and its values in gemm_params_), when it is the one to refresh
  auto refresh = [&](const std::string& spec, const Tensor& w, bool transposed, Tensor& values, CompactWeight& c) {
    if (!name || *name == spec) c = make_compact_weight(w, f, transposed, values);
  };
  refresh("embed", weights_.embed, true, gemm_weights_.embed, compact_.embed);
  compact_.layers.resize(config_.n_layers);
  for (int64_t i = 0; i < config_.n_layers; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    const LayerWeights& w = weights_.layers[i];
    LayerWeights& out = gemm_weights_.layers[i];
    CompactLayer& c = compact_.layers[i];
    refresh(p + "attn.wq", w.wq, false, out.wq, c.wq);
    refresh(p + "attn.wk", w.wk, false, out.wk, c.wk);
    refresh(p + "attn.wv", w.wv, false, out.wv, c.wv);
    refresh(p + "attn.wo", w.wo, false, out.wo, c.wo);
    if (config_.sparse(i)) continue;
    refresh(p + "mlp.w_gate", w.w_gate, false, out.w_gate, c.w_gate);
    refresh(p + "mlp.w_up", w.w_up, false, out.w_up, c.w_up);
    refresh(p + "mlp.w_down", w.w_down, false, out.w_down, c.w_down);
  }
}

void Model::product(const Tensor& a, const Tensor& w, bool transposed, const CompactWeight& compact, Tensor& c,
                    float alpha, float beta) const {
  if (compact.values.defined() && a.dim(0) <= kCompactMaxRows) return matmul_compact(a, compact, c, alpha, beta);
  matmul(a, false, w, transposed, c, alpha, beta);
}

void Model::bf16_point(Tensor& t) const {
  if (bf16()) round_bf16(t);
}

Model::Weights Model::views_of(const Tensor& flat) const {
  std::unordered_map<std::string, Tensor> by_name;
  for (const ParamInfo& p : info_) by_name[p.name] = flat.view(p.offset, p.shape);
  Weights w;
  w.embed = by_name.at("embed");
  w.final_norm = by_name.at("final_norm.scale");
  for (int64_t i = 0; i < config_.n_layers; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    LayerWeights l{by_name.at(p + "norm.scale"), by_name.at(p + "attn.wq"), by_name.at(p + "attn.wk"),
                   by_name.at(p + "attn.wv"), by_name.at(p + "attn.wo"), {}, {}, {}, {}, {}, {}, {}};
    if (config_.sparse(i)) {
      l.router = by_name.at(p + "mlp.router");
      l.experts_gate = by_name.at(p + "mlp.experts.w_gate");
      l.experts_up = by_name.at(p + "mlp.experts.w_up");
      l.experts_down = by_name.at(p + "mlp.experts.w_down");
    } else {
      l.w_gate = by_name.at(p + "mlp.w_gate");
      l.w_up = by_name.at(p + "mlp.w_up");
      l.w_down = by_name.at(p + "mlp.w_down");
    }
    w.layers.push_back(l);
  }
  return w;
}

AttentionShape Model::attention_shape(int64_t batch, int64_t seq) const {
  return {batch, seq, local_heads(), config_.n_kv_heads, config_.head_dim,
          shard_.rank * local_heads(), config_.n_heads / config_.n_kv_heads, bf16()};
}

// Size every activation and scratch buffer for batch shape [B, T], once per shape. Built aside
// and swapped in whole, so a failed allocation leaves the model as it was.
void Model::prepare(int64_t batch, int64_t seq) {
  if (batch == act_.batch && seq == act_.seq) return;
  Activations a;
  const int64_t rows = batch * seq, D = config_.d_model, F = local_ffn();
  const int64_t qw = local_heads() * config_.head_dim, kvw = config_.n_kv_heads * config_.head_dim;
  // the activations the bf16 mode rounds (run_forward's list)
  a.batch = batch;
  a.seq = seq;
  a.tokens = Tensor::zeros({rows}, DType::I32, device_);
  a.targets = Tensor::zeros({rows}, DType::I32, device_);
  a.positions = Tensor::zeros({rows}, DType::I32, device_);
  a.tokens_host = host_twin(a.tokens);
  a.targets_host = host_twin(a.targets);
  a.positions_host = host_twin(a.positions);
  for (int64_t r = 0; r < rows; ++r) a.positions_host.host_data<int32_t>()[r] = static_cast<int32_t>(r % seq);
  upload(a.positions_host, a.positions);
  a.loss_sums = Tensor::zeros({2}, DType::F64, device_);
  a.x = f32({rows, D});
  for (int64_t i = 0; i < config_.n_layers; ++i)
    a.layers.push_back(layer_activations(rows, batch * local_heads() * seq, config_.sparse(i)));
  if (config_.n_experts > 0) moe_scratch(a, rows, true);
  a.final_xhat = f32({rows, D});
  a.final_rstd = f32({rows});
  a.final_h = rounded({rows, D});
  if (sharded()) a.branches = f32({rows, D});
  a.dx = f32({rows, D});
  if (bf16()) a.dx_bf16 = rounded({rows, D});
  a.dh = f32({rows, D});
  a.dfinal_h = f32({rows, D});
  a.dattn = rounded({rows, qw});
  a.dq = rounded({rows, qw});
  a.dk = rounded({rows, kvw});
  a.dv = rounded({rows, kvw});
  a.swiglu = rounded({rows, F});
  a.dswiglu = rounded({rows, F});
  a.dgate = rounded({rows, F});
  a.dup = rounded({rows, F});
  const int64_t chunk = logits_chunk_rows(local_vocab(), rows, device_);
  a.logits_chunk = f32({chunk, local_vocab()});
  if (activation_dtype() == DType::BF16) a.dz_bf16 = rounded({chunk, local_vocab()});
  a.row_lse = f32({chunk});
  a.row_picked = f32({chunk});
  a.row_shift = f32({chunk});
  a.attention = AttentionWorkspace::create(attention_shape(batch, seq), device_, true);
  act_ = std::move(a);
}

// Inference buffers for `rows` rows against `cache`: one layer's activations, no backward
// scratch, attention tiles as long as the cache. Rebuilt (aside, then swapped in) when the
// row count or the cache's shape changes.
void Model::prepare_inference(int64_t rows, const KVCache& cache) {
  const int64_t logit_rows = std::min(rows, cache.slots);
  Activations& cur = infer_;
  if (rows == cur.batch && cache.capacity == cur.cache_capacity &&
      cur.logits.dim(0) == logit_rows)
    return;
  Activations a;
  const int64_t D = config_.d_model, F = config_.ffn_dim;
  a.batch = rows;
  a.seq = 1;
  a.cache_capacity = cache.capacity;
  a.tokens = Tensor::zeros({rows}, DType::I32, device_);
  a.positions = Tensor::zeros({rows}, DType::I32, device_);
  a.slots = Tensor::zeros({rows}, DType::I32, device_);
  a.tokens_host = host_twin(a.tokens);
  a.positions_host = host_twin(a.positions);
  a.slots_host = host_twin(a.slots);
  a.x = f32({rows, D});
  a.layers.push_back(layer_activations(rows, rows * config_.n_heads, false));
  if (config_.n_experts > 0) {  // the sparse layers' own (layers[1])
    a.layers.push_back(layer_activations(rows, rows * config_.n_heads, true));
    moe_scratch(a, rows, false);
  }
  a.swiglu = rounded({rows, F});
  a.final_xhat = f32({rows, D});
  a.final_rstd = f32({rows});
  a.final_h = rounded({rows, D});
  a.attention = AttentionWorkspace::create(
      {cache.slots, cache.capacity, config_.n_heads, config_.n_kv_heads, config_.head_dim}, device_, false);
  a.logit_rows = Tensor::zeros({logit_rows}, DType::I32, device_);
  a.logit_rows_host = host_twin(a.logit_rows);
  a.logit_h = rounded({logit_rows, D});
  a.logits = f32({logit_rows, config_.vocab_size});
  decode_recording_.reset();  // its tensors are about to go
  infer_ = std::move(a);
}

Tensor Model::f32(std::vector<int64_t> shape) const { return Tensor::zeros(std::move(shape), DType::F32, device_); }

Tensor Model::rounded(std::vector<int64_t> shape) const {
  return Tensor::zeros(std::move(shape), activation_dtype(), device_);
}

Model::LayerActivations Model::layer_activations(int64_t rows, int64_t lse_size, bool sparse) const {
  const int64_t D = config_.d_model, qw = local_heads() * config_.head_dim, kvw = config_.n_kv_heads * config_.head_dim;
  auto i32 = [&](std::vector<int64_t> shape) { return Tensor::zeros(std::move(shape), DType::I32, device_); };
  LayerActivations a{f32({rows, D}), f32({rows}), rounded({rows, D}), rounded({rows, qw}), rounded({rows, kvw}),
                     rounded({rows, kvw}), rounded({rows, qw}), f32({lse_size}), {}, {}, {}, {}, {}, {}, {}, {},
                     {}, {}, {}, {}};
  if (!sparse) {
    a.gate = rounded({rows, local_ffn()});
    a.up = rounded({rows, local_ffn()});
    return a;
  }
  const int64_t E = config_.n_experts, k = config_.expert_top_k, Fe = config_.expert_ffn_dim;
  a.gate = rounded({rows * k, Fe});
  a.up = rounded({rows * k, Fe});
  a.probs = f32({rows, E});
  a.router_lse = f32({rows});
  a.experts = i32({rows, k});
  a.weights = f32({rows, k});
  a.order = i32({rows * k});
  a.slot_of = i32({rows, k});
  a.offsets = i32({local_experts() + 1});
  a.offsets_host = host_twin(a.offsets);
  a.expert_x = rounded({rows * k, D});
  a.expert_y = f32({rows * k, D});
  return a;
}

void Model::moe_scratch(Activations& a, int64_t rows, bool backward) const {
  const int64_t D = config_.d_model, E = config_.n_experts, k = config_.expert_top_k, Fe = config_.expert_ffn_dim;
  a.router_logits = f32({rows, E});
  a.expert_a = rounded({rows * k, Fe});
  if (activation_dtype() != DType::F32) a.h_wide = f32({rows, D});
  a.moe_stats = Tensor::zeros({std::max<int64_t>(1, config_.sparse_layers()), 2 * E + 1}, DType::F64, device_);
  if (!backward) return;
  a.dlogits = f32({rows, E});
  a.dprobs = f32({rows, E});
  a.dweights = f32({rows, k});
  a.expert_dy = rounded({rows * k, D});
  a.expert_da = rounded({rows * k, Fe});
  a.expert_dgate = rounded({rows * k, Fe});
  a.expert_dup = rounded({rows * k, Fe});
  a.expert_dx = f32({rows * k, D});
}

void Model::add_router_losses(LossStats& stats) const {
  const int64_t E = config_.n_experts, layers = config_.sparse_layers();
  const double k = static_cast<double>(config_.expert_top_k);
  const Tensor all = act_.moe_stats.to(Device::CPU);
  const double* st = all.host_data<double>();
  stats.expert_load.assign(E, 0.0);
  for (int64_t l = 0; l < layers; ++l) {
    const double* s = st + l * (2 * E + 1);
    double assignments = 0.0;  // N·k, N the rows over every data rank
    for (int64_t e = 0; e < E; ++e) assignments += s[E + e];
    const double N = assignments / k;
    double balance = 0.0;
    for (int64_t e = 0; e < E; ++e) {
      const double share = s[E + e] / (N * k);
      balance += share * (s[e] / N);
      stats.expert_load[e] += share / layers;
    }
    stats.balance += E * balance / layers;
    stats.router_z += s[2 * E] / N / layers;
  }
  stats.loss += config_.router_aux_loss * stats.balance + config_.router_z_loss * stats.router_z;
}

const Tensor& Model::router_input(Activations& act, LayerActivations& a) {
  if (!act.h_wide.defined()) return a.h;
  copy(a.h, act.h_wide);  // bf16 storage: widened (exact)
  return act.h_wide;
}

// PALM_SPEC "Sparse activation" for a layer's rows h (forward):
//   r = h @ router (float32);  route: softmax, top-k, renormalised weights w;  dispatch: the rows
//   of each local expert gathered (x);  per expert e: gate = R(x W~gate_e), up = R(x W~up_e),
//   a = R(silu(gate) up), y = a W~down_e (float32);  out += Σ_s w_s · y_s  (rows in order)
void Model::moe_forward(Activations& act, LayerActivations& a, const LayerWeights& w, const LayerWeights& master,
                        int64_t index, Tensor& out) {
  const int64_t N = a.h.dim(0), E = config_.n_experts, k = config_.expert_top_k, El = local_experts();
  Tensor logits = act.router_logits.rows(0, N);
  matmul(router_input(act, a), false, master.router, false, logits);
  Tensor stats = act.moe_stats.view(index * (2 * E + 1), {2 * E + 1});
  moe_route(logits, k, a.probs, a.router_lse, a.experts, a.weights, stats);
  moe_dispatch(a.experts, expert_first(), El, a.order, a.slot_of, a.offsets);
  if (a.offsets_host.raw_data() != a.offsets.raw_data())
    copy(a.offsets, a.offsets_host);  // the experts' row counts size their GEMMs (on a GPU: one wait)
  const int32_t* off = a.offsets_host.host_data<int32_t>();
  const int64_t P = off[El];  // the assignments to this rank's experts
  if (P == 0) return;
  Tensor x = a.expert_x.rows(0, P), gate = a.gate.rows(0, P), up = a.up.rows(0, P), act_a = act.expert_a.rows(0, P);
  embedding_forward(a.h, a.order.view(0, {P}), x);  // the rows, gathered by expert
  const int64_t D = config_.d_model, Fe = config_.expert_ffn_dim;
  for (int64_t e = 0; e < El; ++e) {
    if (off[e + 1] == off[e]) continue;
    const Tensor xe = x.rows(off[e], off[e + 1]);
    Tensor ge = gate.rows(off[e], off[e + 1]), ue = up.rows(off[e], off[e + 1]);
    matmul(xe, false, w.experts_gate.view(e * D * Fe, {D, Fe}), false, ge);
    matmul(xe, false, w.experts_up.view(e * D * Fe, {D, Fe}), false, ue);
  }
  bf16_point(gate);
  bf16_point(up);
  swiglu_forward(gate, up, act_a);
  bf16_point(act_a);
  Tensor y = a.expert_y.rows(0, P);
  for (int64_t e = 0; e < El; ++e) {
    if (off[e + 1] == off[e]) continue;
    Tensor ye = y.rows(off[e], off[e + 1]);
    matmul(act_a.rows(off[e], off[e + 1]), false, w.experts_down.view(e * Fe * D, {Fe, D}), false, ye);
  }
  moe_combine(a.expert_y, a.slot_of, &a.weights, out);
}

// The backward of moe_forward, given dx (the layer's output gradient as the GEMMs read it):
//   dy_s = R(w_s dx), dw_s = dx · y_s;  per expert: dW~down += aᵀ dy, da = R(dy W~downᵀ),
//   dgate, dup = R(swiglu'), dW~gate += xᵀ dgate, dW~up += xᵀ dup, dx_e = dgate W~gateᵀ + dup W~upᵀ
//   (float32), dh += Σ_s dx_e over the row's slots;  router: dprobs through the weights (summed
//   over the model axis: each rank saw its experts' slots), the auxiliary losses and the softmax
//   give dr; drouter += hᵀ dr, dh += dr routerᵀ (after dh's own all-reduce: the router is replicated).
void Model::moe_backward(LayerActivations& a, const LayerWeights& w, LayerWeights& grads, int64_t index,
                         const Tensor& dx, double aux_scale) {
  Activations& act = act_;
  const int64_t N = a.h.dim(0), E = config_.n_experts, k = config_.expert_top_k, El = local_experts();
  const int64_t D = config_.d_model, Fe = config_.expert_ffn_dim;
  const int32_t* off = a.offsets_host.host_data<int32_t>();
  const int64_t P = off[El];
  moe_combine_backward(dx, a.expert_y, a.slot_of, a.weights, act.expert_dy, act.dweights);
  if (P > 0) {
    Tensor dy = act.expert_dy.rows(0, P), da = act.expert_da.rows(0, P), act_a = act.expert_a.rows(0, P);
    Tensor gate = a.gate.rows(0, P), up = a.up.rows(0, P), x = a.expert_x.rows(0, P);
    Tensor dgate = act.expert_dgate.rows(0, P), dup = act.expert_dup.rows(0, P), dxe = act.expert_dx.rows(0, P);
    bf16_point(dy);
    swiglu_forward(gate, up, act_a);  // recomputed rather than kept per layer
    bf16_point(act_a);
    for (int64_t e = 0; e < El; ++e) {
      if (off[e + 1] == off[e]) continue;
      const Tensor dye = dy.rows(off[e], off[e + 1]);
      Tensor dwd = grads.experts_down.view(e * Fe * D, {Fe, D}), dae = da.rows(off[e], off[e + 1]);
      matmul(act_a.rows(off[e], off[e + 1]), true, dye, false, dwd, 1.0f, 1.0f);
      matmul(dye, false, w.experts_down.view(e * Fe * D, {Fe, D}), true, dae);
    }
    bf16_point(da);
    swiglu_backward(gate, up, da, dgate, dup);
    bf16_point(dgate);
    bf16_point(dup);
    for (int64_t e = 0; e < El; ++e) {
      if (off[e + 1] == off[e]) continue;
      const Tensor xe = x.rows(off[e], off[e + 1]);
      const Tensor dge = dgate.rows(off[e], off[e + 1]), due = dup.rows(off[e], off[e + 1]);
      Tensor dwg = grads.experts_gate.view(e * D * Fe, {D, Fe}), dwu = grads.experts_up.view(e * D * Fe, {D, Fe});
      Tensor dxr = dxe.rows(off[e], off[e + 1]);
      matmul(xe, true, dge, false, dwg, 1.0f, 1.0f);
      matmul(xe, true, due, false, dwu, 1.0f, 1.0f);
      matmul(dge, false, w.experts_gate.view(e * D * Fe, {D, Fe}), true, dxr);
      matmul(due, false, w.experts_up.view(e * D * Fe, {D, Fe}), true, dxr, 1.0f, 1.0f);
    }
    moe_combine(act.expert_dx, a.slot_of, nullptr, act.dh);
  }
  // the router (float32 throughout)
  Tensor dprobs = act.dprobs.rows(0, N), dlogits = act.dlogits.rows(0, N);
  moe_weights_backward(a.probs, a.experts, a.weights, act.dweights, dprobs);
  if (sharded()) all_reduce(dprobs);
  const int64_t sparse = config_.sparse_layers();
  moe_logits_backward(a.probs, a.router_lse, dprobs, act.moe_stats.view(index * (2 * E + 1), {2 * E + 1}), k,
                      aux_scale * config_.router_aux_loss / sparse, aux_scale * config_.router_z_loss / sparse,
                      dlogits);
  const Tensor& h = router_input(act, a);
  matmul(h, true, dlogits, false, grads.router, 1.0f, 1.0f);
}

void Model::check_shape(const Tensor& tokens, const char* what) const {
  require(tokens.dtype() == DType::I32, std::string(what) + " must be int32");
  require(tokens.ndim() == 2, std::string(what) + " must be 2-D [batch, seq], got " + tokens.shape_string());
  require(tokens.dim(0) > 0 && tokens.dim(1) > 0, std::string(what) + " must not be empty");
  require(tokens.dim(1) <= config_.max_seq_len,
          std::string(what) + " has sequence length " + std::to_string(tokens.dim(1)) +
              " > max_seq_len " + std::to_string(config_.max_seq_len));
}

// Ids are checked in the model's own copy, never in the caller's memory, which another
// thread could change between the check and the use.
static void check_ids(const Tensor& ids, const char* what, int64_t vocab, bool allow_ignored) {
  const int32_t* t = ids.host_data<int32_t>();
  for (int64_t i = 0; i < ids.numel(); ++i)
    if (t[i] >= vocab || (t[i] < 0 && !allow_ignored))
      throw std::invalid_argument(std::string(what) + " id " + std::to_string(t[i]) + " at flat index " +
                                  std::to_string(i) + " is outside the vocabulary [0, " +
                                  std::to_string(vocab) + ")");
}

void Model::load_batch(const Tensor& tokens, const Tensor* targets) {
  check_shape(tokens, "tokens");
  if (targets) {
    check_shape(*targets, "targets");
    require(targets->shape() == tokens.shape(), "targets shape " + targets->shape_string() +
                                                    " differs from tokens shape " + tokens.shape_string());
  }
  prepare(tokens.dim(0), tokens.dim(1));
  copy(tokens.reshape({tokens.numel()}), act_.tokens_host);
  check_ids(act_.tokens_host, "tokens", config_.vocab_size, false);
  upload(act_.tokens_host, act_.tokens);
  if (targets) {
    copy(targets->reshape({targets->numel()}), act_.targets_host);
    check_ids(act_.targets_host, "targets", config_.vocab_size, true);
    upload(act_.targets_host, act_.targets);
  }
}

// x = embed[t]; each layer: h = LN(x); x += attn(h) @ wo + swiglu(h) @ w_down; final LN.
// Against a cache, each layer first writes the rows' keys and values into it. Sharded over the
// model axis (PALM_SPEC "Sharded layout"), a rank looks up the ids of its vocabulary rows and
// computes its heads and MLP units; x = the all-reduce of those pieces, once for the embedding
// and once per layer (the parallel block lets both branches share it).
//
// The bf16 mode's rounding points R(·) (PALM_SPEC "Precision"; R = round to bf16, ties to even),
// with W~ = R(W) the weight copy of every GEMM weight and the embedding:
//   forward   x = E~[t];  h = R(LN(x));  q = R(rope(R(h W~q))), k = R(rope(R(h W~k))), v = R(h W~v);
//             attention with p = R(softmax(s)); o = R(p v);  gate = R(h W~gate), up = R(h W~up),
//             a = R(silu(gate) up);  x += o W~o + a W~down (x stays float32);
//             hf = R(LN(x));  z = hf E~ᵀ / √D (float32; the loss is float32)
//   backward  dz = R(dz);  dhf = dz E~ / √D;  per layer: dxr = R(dx) feeds the GEMMs;
//             do = R(dxr W~oᵀ), da = R(dxr W~downᵀ), dgate = R(·), dup = R(·);
//             attention backward with p = R(exp(s - lse)) and ds' = R(p (dp - D) / √dh);
//             dq = R(rope⁻¹(R(ds' k))), dk = R(rope⁻¹(R(ds'ᵀ q))), dv = R(pᵀ do);
//             dh = Σ d· W~ᵀ (float32);  dW += hᵀ d· (float32);  LN backward and dx float32
void Model::run_forward(Activations& act, KVCache* cache) {
  const float eps = static_cast<float>(config_.norm_eps);
  embedding_forward(gemm_weights_.embed, act.tokens, act.x, vocab_first());
  if (sharded()) all_reduce(act.x);
  if (act.moe_stats.defined()) fill_zero(act.moe_stats);
  static const CompactLayer kNoCompact;
  for (int64_t i = 0, sparse_index = 0; i < config_.n_layers; ++i) {
    const LayerWeights& w = gemm_weights_.layers[i];
    const CompactLayer& cw = compact_.layers.empty() ? kNoCompact : compact_.layers[i];
    const bool sparse = config_.sparse(i);
    LayerActivations& a = act.layers[cache ? (sparse ? 1 : 0) : i];
    layernorm_forward(act.x, weights_.layers[i].norm, eps, a.h, a.xhat, a.rstd);
    bf16_point(a.h);
    product(a.h, w.wq, false, cw.wq, a.q);
    product(a.h, w.wk, false, cw.wk, a.k);
    product(a.h, w.wv, false, cw.wv, a.v);
    bf16_point(a.q);
    bf16_point(a.k);
    bf16_point(a.v);
    rope_apply(a.q, act.positions, rope_cos_, rope_sin_, local_heads(), false);
    rope_apply(a.k, act.positions, rope_cos_, rope_sin_, config_.n_kv_heads, false);
    bf16_point(a.q);
    bf16_point(a.k);
    if (cache) {
      kv_cache_write(a.k, a.v, act.slots, act.positions, cache->keys[i], cache->values[i], cache->capacity);
      AttentionShape shape{cache->slots, cache->capacity, config_.n_heads, config_.n_kv_heads, config_.head_dim};
      shape.bf16 = bf16();
      attention_cached(a.q, act.slots, act.positions, cache->keys[i], cache->values[i], a.attn, shape,
                       act.attention);
    } else {
      attention_forward(a.q, a.k, a.v, a.attn, a.lse, attention_shape(act.batch, act.seq), act.attention);
    }
    bf16_point(a.attn);
    if (sparse) {  // the parallel block with a mixture of experts: both branches add to x
      Tensor& out = sharded() ? act.branches : act.x;
      product(a.attn, w.wo, false, cw.wo, out, 1.0f, sharded() ? 0.0f : 1.0f);
      moe_forward(act, a, w, weights_.layers[i], sparse_index++, out);
      if (!sharded()) continue;
      all_reduce(act.branches);
      add_to(act.x, act.branches);
      continue;
    }
    product(a.h, w.w_gate, false, cw.w_gate, a.gate);
    product(a.h, w.w_up, false, cw.w_up, a.up);
    bf16_point(a.gate);
    bf16_point(a.up);
    swiglu_forward(a.gate, a.up, act.swiglu);
    bf16_point(act.swiglu);
    if (!sharded()) {
      product(a.attn, w.wo, false, cw.wo, act.x, 1.0f, 1.0f);        // parallel block:
      product(act.swiglu, w.w_down, false, cw.w_down, act.x, 1.0f, 1.0f);  // both branches add to x
      continue;
    }
    matmul(a.attn, false, w.wo, false, act.branches);
    matmul(act.swiglu, false, w.w_down, false, act.branches, 1.0f, 1.0f);
    all_reduce(act.branches);
    add_to(act.x, act.branches);
  }
  layernorm_forward(act.x, weights_.final_norm, eps, act.final_h, act.final_xhat, act.final_rstd);
  bf16_point(act.final_h);
}

void Model::all_reduce(Tensor& t) { shard_.comm->all_reduce_sum(t); }

// z = LN(x) @ embed^T / sqrt(D); sharded, each rank's vocabulary columns gathered.
void Model::forward(const Tensor& tokens, Tensor& logits) {
  load_batch(tokens, nullptr);
  run_forward(act_, nullptr);
  const float scale = 1.0f / std::sqrt(static_cast<float>(config_.d_model));
  if (!sharded()) {  // into the caller's tensor, through a device one when it lives elsewhere
    Tensor out = logits.device() == device_ ? logits : Tensor::zeros(logits.shape(), DType::F32, device_);
    product(act_.final_h, gemm_weights_.embed, true, compact_.embed, out, scale);
    if (out.raw_data() != logits.raw_data()) copy(out, logits);
    return;
  }
  const int64_t rows = act_.batch * act_.seq, Vl = local_vocab(), M = shard_.size;
  Tensor mine = Tensor::zeros({rows, Vl}, DType::F32, device_);
  Tensor all = Tensor::zeros({M, rows, Vl}, DType::F32, device_);
  matmul(act_.final_h, false, gemm_weights_.embed, true, mine, scale);
  shard_.comm->all_gather(mine, all);
  const Tensor gathered = all.to(Device::CPU);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(logits.host_data<float>() + r * config_.vocab_size + m * Vl,
                  gathered.host_data<float>() + (m * rows + r) * Vl, Vl * sizeof(float));
}

LossStats Model::forward_backward(const Tensor& tokens, const Tensor& targets, int64_t total_tokens) {
  require(total_tokens >= 0, "total_tokens must be >= 0");
  load_batch(tokens, &targets);
  run_forward(act_, nullptr);
  // every data rank's routing statistics (before any early return: every rank takes part)
  if (shard_.data_comm && act_.moe_stats.defined()) shard_.data_comm->all_reduce_sum(act_.moe_stats);
  const int64_t rows = act_.batch * act_.seq;
  const int32_t* y = act_.targets_host.host_data<int32_t>();
  LossStats stats;
  for (int64_t r = 0; r < rows; ++r) stats.tokens += y[r] >= 0;
  if (stats.tokens == 0) return stats;  // nothing counted: loss 0, no gradient (on every rank alike)

  // Loss and its gradient, a chunk of rows at a time (never the whole [rows, V] logits).
  // Sharded, each rank holds the logits of its vocabulary columns: lse = log Σ_ranks exp(lse_rank)
  // (as max + log Σ exp(lse_rank - max)) and z[y] (from the rank that holds y) are all-reduced.
  const float logit_scale = 1.0f / std::sqrt(static_cast<float>(config_.d_model));
  const float grad_scale = 1.0f / static_cast<float>(total_tokens ? total_tokens : stats.tokens);
  const int64_t chunk = act_.logits_chunk.dim(0);
  fill_zero(act_.loss_sums);
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t r1 = std::min(rows, r0 + chunk), n = r1 - r0;
    Tensor z = act_.logits_chunk.rows(0, n);
    Tensor h = act_.final_h.rows(r0, r1);
    Tensor dh = act_.dfinal_h.rows(r0, r1);
    Tensor lse = act_.row_lse.view(0, {n}), picked = act_.row_picked.view(0, {n});
    const Tensor y_chunk = act_.targets.view(r0, {n});
    matmul(h, false, gemm_weights_.embed, true, z, logit_scale);
    cross_entropy_stats(z, y_chunk, vocab_first(), lse, picked);
    if (sharded()) {  // lse = log Σ_shards exp(lse_shard), as max + log Σ exp(lse_shard - max)
      Tensor top = act_.row_shift.view(0, {n});
      copy(lse, top);
      shard_.comm->all_reduce_max(top);
      lse_combine(lse, top, false);
      all_reduce(lse);
      lse_combine(lse, top, true);
      all_reduce(picked);
    }
    cross_entropy_sums(lse, picked, y_chunk, config_.z_loss, act_.loss_sums);
    cross_entropy_backward(z, y_chunk, vocab_first(), lse, static_cast<float>(config_.z_loss), grad_scale);
    Tensor dz = z;  // the GEMMs' dz = R(dz): rounded in place, or into bfloat16 storage
    if (act_.dz_bf16.defined()) {
      dz = act_.dz_bf16.rows(0, n);
      copy(z, dz);
    }
    bf16_point(dz);
    matmul(dz, false, gemm_weights_.embed, false, dh, logit_scale);                // dh = dz @ E / √D
    matmul(dz, true, h, false, weight_grads_.embed, logit_scale, 1.0f);            // dE += dzᵀ h / √D
  }
  const Tensor sums = act_.loss_sums.to(Device::CPU);  // the one read-back of the loss
  stats.ce = sums.host_data<double>()[0] / stats.tokens;
  stats.loss = sums.host_data<double>()[1] / stats.tokens;
  if (config_.sparse_layers() > 0) add_router_losses(stats);
  // the routers' losses enter each call's gradient as its share of the counted targets; over a
  // data axis their statistics already cover every rank's rows (total_tokens counts them too)
  const double aux_scale =
      shard_.data_comm ? 1.0 : static_cast<double>(stats.tokens) / (total_tokens ? total_tokens : stats.tokens);
  if (sharded()) all_reduce(act_.dfinal_h);

  fill_zero(act_.dx);
  layernorm_backward(act_.dfinal_h, act_.final_xhat, act_.final_rstd, weights_.final_norm, act_.dx,
                     weight_grads_.final_norm);
  for (int64_t i = config_.n_layers - 1, sparse_index = config_.sparse_layers(); i >= 0; --i) {
    const LayerWeights& w = gemm_weights_.layers[i];
    LayerWeights& gw = weight_grads_.layers[i];
    LayerActivations& a = act_.layers[i];
    const bool sparse = config_.sparse(i);
    if (sparse) --sparse_index;
    // dx reaches both branches unchanged (x_out = x_in + attn + mlp); the GEMMs read it rounded
    // in the bf16 mode, while dx itself keeps accumulating in float32.
    Tensor& dx = bf16() ? act_.dx_bf16 : act_.dx;
    if (bf16()) {
      copy(act_.dx, dx);
      round_bf16(dx);
    }
    matmul(a.attn, true, dx, false, gw.wo, 1.0f, 1.0f);
    matmul(dx, false, w.wo, true, act_.dattn);
    bf16_point(act_.dattn);
    if (!sparse) {
      swiglu_forward(a.gate, a.up, act_.swiglu);  // recomputed rather than kept per layer
      bf16_point(act_.swiglu);
      matmul(act_.swiglu, true, dx, false, gw.w_down, 1.0f, 1.0f);
      matmul(dx, false, w.w_down, true, act_.dswiglu);
      bf16_point(act_.dswiglu);
      swiglu_backward(a.gate, a.up, act_.dswiglu, act_.dgate, act_.dup);
      bf16_point(act_.dgate);
      bf16_point(act_.dup);
    }
    attention_backward(a.q, a.k, a.v, a.attn, a.lse, act_.dattn, act_.dq, act_.dk, act_.dv,
                       attention_shape(act_.batch, act_.seq), act_.attention);
    bf16_point(act_.dq);
    bf16_point(act_.dk);
    bf16_point(act_.dv);
    rope_apply(act_.dq, act_.positions, rope_cos_, rope_sin_, local_heads(), true);
    rope_apply(act_.dk, act_.positions, rope_cos_, rope_sin_, config_.n_kv_heads, true);
    bf16_point(act_.dq);
    bf16_point(act_.dk);
    // dh = Σ over the five projections of h: d(out) @ Wᵀ; dW += hᵀ d(out). Sharded, the split
    // projections' part of dh and the shared key/value head's gradients (from this rank's query
    // heads only) are all-reduced first: one all-reduce of dh per layer, two small ones.
    const std::pair<const Tensor*, Tensor*> split[] = {{&w.wq, &act_.dq}, {&w.w_gate, &act_.dgate}, {&w.w_up, &act_.dup}};
    Tensor* split_grad[] = {&gw.wq, &gw.w_gate, &gw.w_up};
    for (int j = 0; j < (sparse ? 1 : 3); ++j) {  // a sparse layer: wq, then its experts
      matmul(*split[j].second, false, *split[j].first, true, act_.dh, 1.0f, j == 0 ? 0.0f : 1.0f);
      matmul(a.h, true, *split[j].second, false, *split_grad[j], 1.0f, 1.0f);
    }
    if (sparse) moe_backward(a, w, gw, sparse_index, dx, aux_scale);
    if (sharded()) {
      all_reduce(act_.dh);
      all_reduce(act_.dk);
      all_reduce(act_.dv);
    }
    const std::pair<const Tensor*, Tensor*> shared[] = {{&w.wk, &act_.dk}, {&w.wv, &act_.dv}};
    Tensor* shared_grad[] = {&gw.wk, &gw.wv};
    for (int j = 0; j < 2; ++j) {
      matmul(*shared[j].second, false, *shared[j].first, true, act_.dh, 1.0f, 1.0f);
      matmul(a.h, true, *shared[j].second, false, *shared_grad[j], 1.0f, 1.0f);
    }
    if (sparse) {  // the router's part of dh (replicated: after the all-reduce)
      Tensor dlogits = act_.dlogits.rows(0, a.h.dim(0));
      matmul(dlogits, false, weights_.layers[i].router, true, act_.dh, 1.0f, 1.0f);
    }
    layernorm_backward(act_.dh, a.xhat, a.rstd, weights_.layers[i].norm, act_.dx, gw.norm);
  }
  embedding_backward(act_.dx, act_.tokens, weight_grads_.embed, vocab_first());
  return stats;
}

KVCache Model::make_cache(int64_t slots, int64_t capacity) const {
  require(slots > 0, "a cache needs at least one slot, got " + std::to_string(slots));
  require(capacity > 0 && capacity <= config_.max_seq_len,
          "cache capacity must be in [1, max_seq_len = " + std::to_string(config_.max_seq_len) + "], got " +
              std::to_string(capacity));
  const long double floats = static_cast<long double>(slots) * capacity * config_.n_kv_heads *
                             config_.head_dim * 2 * config_.n_layers;
  require(floats < 0x1p40L, "a cache of " + std::to_string(slots) + " slots x " + std::to_string(capacity) +
                                " positions is too large");
  if (device_ == Device::CPU)  // a device cache is checked against the device's memory as it is allocated
    require_memory("the key/value cache", static_cast<uint64_t>(floats) * dtype_size(activation_dtype()),
                   "the keys and values of " + std::to_string(slots) + " slots x " + std::to_string(capacity) +
                       " positions");
  static std::atomic<uint64_t> caches_made{0};
  KVCache cache;
  cache.id = ++caches_made;
  cache.slots = slots;
  cache.capacity = capacity;
  cache.lengths.assign(slots, 0);
  const int64_t kvw = config_.n_kv_heads * config_.head_dim;
  for (int64_t i = 0; i < config_.n_layers; ++i) {
    cache.keys.push_back(Tensor::zeros({slots * capacity, kvw}, activation_dtype(), device_));
    cache.values.push_back(Tensor::zeros({slots * capacity, kvw}, activation_dtype(), device_));
  }
  return cache;
}

Tensor Model::forward_cached(KVCache& cache, const Tensor& tokens, const Tensor& slots) {
  require(!sharded(), "generation runs on an unsharded model: gather the state_dict into one first");
  require(tokens.dtype() == DType::I32 && slots.dtype() == DType::I32, "tokens and slots must be int32");
  require(tokens.ndim() == 1 && slots.ndim() == 1 && tokens.dim(0) == slots.dim(0) && tokens.dim(0) > 0,
          "tokens and slots must be 1-D, non-empty and of one length, got " + tokens.shape_string() + " and " +
              slots.shape_string());
  require(static_cast<int64_t>(cache.keys.size()) == config_.n_layers && cache.capacity <= config_.max_seq_len &&
              cache.keys[0].dim(1) == config_.n_kv_heads * config_.head_dim,
          "the cache was made for a model of another shape");
  require(cache.keys[0].dtype() == activation_dtype(),
          "the cache was made for another precision (its keys are " + std::string(dtype_name(cache.keys[0].dtype())) +
              ", this model's activations " + dtype_name(activation_dtype()) + "): make a new cache");
  const int64_t rows = tokens.dim(0);
  prepare_inference(rows, cache);
  Activations& a = infer_;
  copy(tokens, a.tokens_host);
  copy(slots, a.slots_host);
  check_ids(a.tokens_host, "tokens", config_.vocab_size, false);
  // Positions continue each slot's sequence; the logits wanted are each slot's last row here.
  const int32_t* slot = a.slots_host.host_data<int32_t>();
  std::vector<int64_t> length = cache.lengths, last_row(cache.slots, -1);
  for (int64_t r = 0; r < rows; ++r) {
    require(slot[r] >= 0 && slot[r] < cache.slots, "slot " + std::to_string(slot[r]) + " at row " +
                                                       std::to_string(r) + " is outside the cache's " +
                                                       std::to_string(cache.slots) + " slots");
    require(length[slot[r]] < cache.capacity, "slot " + std::to_string(slot[r]) + " would grow past the cache capacity of " +
                                                  std::to_string(cache.capacity) + " positions");
    a.positions_host.host_data<int32_t>()[r] = static_cast<int32_t>(length[slot[r]]++);
    last_row[slot[r]] = r;
  }
  int64_t n = 0;
  for (int64_t r = 0; r < rows; ++r)
    if (last_row[slot[r]] == r) a.logit_rows_host.host_data<int32_t>()[n++] = static_cast<int32_t>(r);
  for (auto [host, dst] : {std::pair{&a.tokens_host, &a.tokens}, {&a.slots_host, &a.slots},
                           {&a.positions_host, &a.positions}, {&a.logit_rows_host, &a.logit_rows}})
    upload(*host, *dst);

  Tensor wanted = a.logit_rows.view(0, {n});
  Tensor h = a.logit_h.rows(0, n);
  Tensor logits = a.logits.rows(0, n);
  // The device work: the same tensors on every decode step of this batch shape and cache, so on
  // CUDA it is recorded once and replayed as a graph (the ids and positions uploaded above).
  const auto step = [&] {
    run_forward(a, &cache);
    // z = LN(x) @ embed^T / sqrt(D), for the wanted rows only (gathered like an embedding lookup)
    embedding_forward(a.final_h, wanted, h);
    product(h, gemm_weights_.embed, true, compact_.embed, logits, 1.0f / std::sqrt(static_cast<float>(config_.d_model)));
  };
  const std::tuple<int64_t, int64_t, uint64_t, DType, KernelChoice> recorded_for{rows, n, cache.id, activation_dtype(),
                                                                                  kernel_choice()};
  if (recorded_for != recorded_for_) {
    decode_recording_.reset();
    recorded_for_ = recorded_for;
  }
  if (config_.sparse_layers() > 0)
    step();  // the experts' GEMMs are sized by this step's routing: nothing to replay
  else
    decode_recording_.run(device_, step);
  cache.lengths = std::move(length);
  return logits;
}

}  // namespace palmcore
