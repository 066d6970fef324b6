// The PaLM model (PALM_SPEC.md): parameters in one flat buffer, the graph written once over
// the ops of palmcore/ops.h, activations sized once per batch shape.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "palmcore/communicator.h"
#include "palmcore/compact_weights.h"
#include "palmcore/ops.h"
#include "palmcore/recording.h"
#include "palmcore/tensor.h"

namespace palmcore {

struct ModelConfig {
  int64_t vocab_size, d_model, n_layers, n_heads, n_kv_heads, head_dim, ffn_dim, max_seq_len;
  double rope_base, norm_eps, z_loss;
  // Sparse activation (PALM_SPEC "Sparse activation"): with n_experts > 0, layer i's MLP is a
  // mixture of n_experts SwiGLU experts of width expert_ffn_dim when i % moe_every == moe_every - 1.
  int64_t n_experts = 0, expert_top_k = 2, expert_ffn_dim = 0, moe_every = 1;
  double router_aux_loss = 1e-2, router_z_loss = 1e-3;
  bool sparse(int64_t layer) const { return n_experts > 0 && layer % moe_every == moe_every - 1; }
  int64_t sparse_layers() const { return n_experts > 0 ? n_layers / moe_every : 0; }
  // Throws std::invalid_argument naming the first field that breaks the spec's rules.
  void validate() const;
};

// One named parameter: its spec name, the shape of this rank's piece, its place in the flat
// buffer and its init std (0 means "initialized to ones", the norm scales). A parameter split
// over the model axis (PALM_SPEC "Sharded layout") holds the slice [split_offset,
// split_offset + shape[split_axis]) of full_shape along split_axis; split_axis -1: replicated.
struct ParamInfo {
  std::string name;
  std::vector<int64_t> shape;
  int64_t offset;
  double init_std;
  std::vector<int64_t> full_shape;
  int split_axis = -1;
  int64_t split_offset = 0;
  int64_t numel() const;
  int64_t full_numel() const;
};

// This rank's place on the mesh's model axis and the communicator of its model group: each
// split parameter holds slice `rank` of `size` (PALM_SPEC "Sharded layout").
struct ModelShard {
  int64_t rank = 0, size = 1;
  std::shared_ptr<Communicator> comm;  // a single-rank one when null
  // The mesh's data axis (null: one data rank). Only the sparse layers' routing statistics go
  // over it: their auxiliary losses are means over the whole batch, every data rank's rows.
  std::shared_ptr<Communicator> data_comm;
};

struct LossStats {
  double loss = 0.0;  // mean over counted positions of ce + z_loss · lse² (+ the routers' losses)
  double ce = 0.0;    // mean over counted positions of ce
  int64_t tokens = 0; // counted positions (targets >= 0)
  // Sparse layers, averaged over them: the load-balance loss E · Σ_e f_e P_e and the router
  // z-loss mean lse(r)² (in `loss` with their coefficients), and the share of assignments per
  // expert (f_e, averaged over the sparse layers; empty for a dense model).
  double balance = 0.0, router_z = 0.0;
  std::vector<double> expert_load;
};

// The key/value cache of sequences being generated. For every layer it holds the keys and values
// of each slot's positions so far, n_kv_heads heads wide: with multi-query attention (PaLM's
// choice) that is one head per layer, H times smaller than a multi-head cache.
struct KVCache {
  uint64_t id = 0;  // unique per cache made (a recorded decode step names its cache by it)
  int64_t slots = 0, capacity = 0;
  std::vector<Tensor> keys, values;  // per layer [slots · capacity, Hkv·dh]
  std::vector<int64_t> lengths;      // positions held per slot
};

// RoPE's angle tables for positions [0, positions): cos and sin of p · base^(-2i/dh), [positions, dh/2].
void make_rope_tables(int64_t positions, int64_t head_dim, double base, Tensor& cos_table, Tensor& sin_table);

// PALM_SPEC "Precision". FP32 computes in float32. BF16 is mixed precision: every GEMM reads a
// bf16 copy of the weights and bf16 inputs and accumulates in float32; the activations the
// spec stores in bf16 are rounded where they are made (model.cpp lists the points). Those
// activations and the weight copy are stored as bfloat16 (half the bytes: the CUDA kernels'
// form) or as float32 holding bf16 values (the CPU's default: its kernels compute in float32).
// On the CPU both storages give the same bits: the oracle a GPU's bf16 mode must match.
enum class Precision { FP32, BF16 };

class Model {
 public:
  // Throws std::invalid_argument if the config breaks the spec, or if the shard's axis does
  // not divide the heads, the MLP's hidden units or the vocabulary. Every rank draws its
  // slice of the same initial weights as an unsharded model of this seed.
  Model(const ModelConfig& config, uint64_t seed, Device device = Device::CPU, ModelShard shard = {});

  const ModelConfig& config() const { return config_; }
  Device device() const { return device_; }
  const ModelShard& shard() const { return shard_; }
  Communicator& model_comm() const { return *shard_.comm; }
  const std::vector<ParamInfo>& params_info() const { return info_; }
  const ParamInfo& info(const std::string& name) const;
  Tensor param(const std::string& name) const;
  Tensor grad(const std::string& name) const;
  Tensor& flat_params() { return params_; }
  Tensor& flat_grads() { return grads_; }

  // Throws std::invalid_argument unless `tokens` is int32 [B, T] with 0 < T <= max_seq_len
  // (ids are checked when a call copies them in).
  void check_shape(const Tensor& tokens, const char* what) const;
  // tokens: int32 [B, T] in [0, V). logits: float [B·T, V] (gathered over the model axis).
  void forward(const Tensor& tokens, Tensor& logits);
  // Adds d(loss)/d(params) to the gradients; targets < 0 are ignored. The loss is a mean over
  // `total_tokens` counted targets (0: this call's own count; data parallelism passes the
  // count of the whole batch over all its ranks, so that their gradients add up to its mean).
  LossStats forward_backward(const Tensor& tokens, const Tensor& targets, int64_t total_tokens = 0);
  void zero_grad() { fill_zero(grads_); }

  Precision precision() const { return precision_; }
  // `storage`: DType::BF16 or DType::F32, the bf16 mode's storage (above); the one-argument form
  // picks the device's own (bfloat16 on CUDA, float32 on the CPU). Throws std::invalid_argument
  // for bfloat16 storage on a sharded model (its collectives move float32).
  void set_precision(Precision precision, DType storage);
  void set_precision(Precision precision) {
    set_precision(precision, device_ == Device::CUDA ? DType::BF16 : DType::F32);
  }
  // The dtype of the activations the spec stores in bf16: bfloat16 only with bf16 storage.
  DType activation_dtype() const { return precision_ == Precision::BF16 ? storage_ : DType::F32; }
  // After anything writes the parameters (an optimizer step), or one of them (a loaded state):
  // refreshes the bf16 copy the GEMMs read.
  void params_changed();
  void param_changed(const std::string& name);
  // The bf16 mode's GEMM copy of the flat parameters (R(params), float32 or bfloat16 storage),
  // or null in fp32. An optimizer that writes it in its update pass need not call params_changed().
  Tensor* rounded_params() { return bf16() ? &gemm_params_ : nullptr; }

  // The GEMM weights' form for decoding (palmcore/compact_weights.h): F32, or a compact copy
  // (BF16, Q8) of every dense layer's wq, wk, wv, wo, w_gate, w_up, w_down and of the embedding,
  // kept beside the float32 parameters (which stay the master: training and state_dict see
  // them). The model then computes with the weights' compact values w': products of a few rows
  // (decode steps) read the compact copy, larger ones (prefill, training) a float32 copy of w'
  // (the same values). Refreshed by params_changed / param_changed. CPU, unsharded, fp32
  // precision only (the formats are weight-only: activations stay float32); a sparse layer's
  // experts and router stay float32.
  void set_weight_format(WeightFormat format);
  WeightFormat weight_format() const { return weight_format_; }

  // An empty cache of `slots` sequences of up to `capacity` <= max_seq_len positions.
  KVCache make_cache(int64_t slots, int64_t capacity) const;
  // Incremental forward (prefill and decode alike). Row r of tokens [rows] (int32) continues the
  // sequence of cache slot slots[r] at its next position; rows of one slot come in order. Their
  // keys and values go into the cache, and each row attends to its slot's positions so far.
  // Returns the logits [n, V] of the last row of each slot in the call, in row order: a view
  // of the model's scratch, valid until the next call. On a bad argument the cache is unchanged.
  Tensor forward_cached(KVCache& cache, const Tensor& tokens, const Tensor& slots);

 private:
  struct LayerWeights {
    Tensor norm, wq, wk, wv, wo, w_gate, w_up, w_down;
    // a sparse layer's instead of w_gate, w_up, w_down: the router [D, E] and this rank's
    // experts [E_l, D, Fe], [E_l, D, Fe], [E_l, Fe, D]
    Tensor router, experts_gate, experts_up, experts_down;
  };
  struct Weights {
    Tensor embed, final_norm;
    std::vector<LayerWeights> layers;
  };
  // The compact copies of set_weight_format (a sparse layer's MLP weights are left empty).
  struct CompactLayer {
    CompactWeight wq, wk, wv, wo, w_gate, w_up, w_down;
  };
  struct CompactWeights {
    CompactWeight embed;  // transposed: the logits are h Eᵀ
    std::vector<CompactLayer> layers;
  };
  struct LayerActivations {
    Tensor xhat, rstd, h, q, k, v, attn, lse, gate, up;
    // a sparse layer (gate and up then hold its assignments' rows, [N·k, Fe], by position):
    // the router's softmax [N, E] and lse [N], the chosen experts and weights [N, k], the
    // dispatch (order [N·k], slot_of [N, k], offsets [E_l + 1] and their host copy), the
    // gathered input rows [N·k, D] and the experts' outputs [N·k, D] (float32)
    Tensor probs, router_lse, experts, weights, order, slot_of, offsets, offsets_host, expert_x, expert_y;
  };
  // Training keeps every layer's activations for the backward pass; inference (batch = rows,
  // seq = 1) has one layer's worth, reused by every layer.
  struct Activations {
    int64_t batch = 0, seq = 0, cache_capacity = 0;
    Tensor tokens, targets, positions, slots, x;
    // The ids as the host sees them: checked there, then copied to the device (the same tensors
    // on the CPU). Positions and the rows whose logits are wanted are computed there too.
    Tensor tokens_host, targets_host, positions_host, slots_host, logit_rows_host;
    Tensor loss_sums;  // float64 [2]: Σ ce and Σ loss over the step's rows, on the device
    std::vector<LayerActivations> layers;
    Tensor final_xhat, final_rstd, final_h;
    // backward scratch (and, sharded, the sum of a layer's two branches before its all-reduce)
    Tensor dx, dh, dfinal_h, dattn, dq, dk, dv, swiglu, dswiglu, dgate, dup, branches;
    Tensor dx_bf16;  // bf16 mode: dx rounded, the GEMMs' copy of the residual gradient
    // sparse layers: the router's logits and their gradient [N, E], the weights' and probabilities'
    // gradients, h in float32 for the router (bf16 storage), the experts' SwiGLU output and
    // gradients [N·k, ·], and every sparse layer's routing statistics (float64 [layers, 2E + 1])
    Tensor router_logits, dlogits, dprobs, dweights, h_wide, expert_a, expert_dy, expert_da, expert_dgate, expert_dup,
        expert_dx, moe_stats;
    Tensor logits_chunk, row_lse, row_picked, row_shift;
    Tensor dz_bf16;  // bf16 storage: the logits' gradient rounded into bfloat16 for the GEMMs
    AttentionWorkspace attention;
    // inference: the rows whose logits are wanted, their final hidden states and logits
    Tensor logit_rows, logit_h, logits;
  };

  Weights views_of(const Tensor& flat) const;
  // C = alpha · A @ op(W) + beta · C (op(W) = Wᵀ when transposed), W one of gemm_weights_:
  // through its compact copy (when there is one) for a few rows of A, else the float32 GEMM.
  void product(const Tensor& a, const Tensor& w, bool transposed, const CompactWeight& compact, Tensor& c,
               float alpha = 1.0f, float beta = 0.0f) const;
  // The compact copies and their float32 values in gemm_params_, made again from the parameters
  // (from parameter *name alone when given).
  void refresh_compact_weights(const std::string* name = nullptr);
  void prepare(int64_t batch, int64_t seq);
  // A new zero tensor on the model's device: float32, or of the bf16 mode's storage (the
  // activations run_forward rounds: bfloat16 or float32, activation_dtype()).
  Tensor f32(std::vector<int64_t> shape) const;
  Tensor rounded(std::vector<int64_t> shape) const;
  // One layer's activations for `rows` rows (lse_size: attention's lse), a sparse layer's or a
  // dense one's; and the sparse layers' shared scratch (with the backward's when `backward`).
  LayerActivations layer_activations(int64_t rows, int64_t lse_size, bool sparse) const;
  void moe_scratch(Activations& a, int64_t rows, bool backward) const;
  void prepare_inference(int64_t rows, const KVCache& cache);
  // Checks shapes, sizes the activations, copies the ids in and checks the copies.
  void load_batch(const Tensor& tokens, const Tensor* targets);
  // A host tensor shaped like t: t itself on the CPU, else a new one to stage data in.
  Tensor host_twin(const Tensor& t) const;
  // dst = host (when they are not the same tensor): staged data to the device.
  void upload(const Tensor& host, Tensor& dst) const;
  // The layers and the final norm over a's rows: causal attention within each sequence, or
  // against the cache when one is given.
  void run_forward(Activations& a, KVCache* cache);
  // t = Σ over the model axis of t, in place.
  void all_reduce(Tensor& t);
  AttentionShape attention_shape(int64_t batch, int64_t seq) const;
  bool bf16() const { return precision_ == Precision::BF16; }
  // In the bf16 mode, t = round_bf16(t): a point where the spec stores an activation in bf16.
  void bf16_point(Tensor& t) const;
  // Heads, MLP units and vocabulary rows this rank holds, and the first vocabulary id.
  int64_t local_heads() const { return config_.n_heads / shard_.size; }
  int64_t local_ffn() const { return config_.ffn_dim / shard_.size; }
  int64_t local_vocab() const { return config_.vocab_size / shard_.size; }
  int64_t local_experts() const { return config_.n_experts / shard_.size; }
  int64_t expert_first() const { return shard_.rank * local_experts(); }
  // A sparse layer's MLP over act's rows (forward: adds it to `out`; backward: adds d h to dh and
  // the experts' and router's gradients); `index` counts the sparse layers.
  void moe_forward(Activations& act, LayerActivations& a, const LayerWeights& w, const LayerWeights& master,
                   int64_t index, Tensor& out);
  void moe_backward(LayerActivations& a, const LayerWeights& w, LayerWeights& grads, int64_t index, const Tensor& dx,
                    double aux_scale);
  // stats' balance, router_z and expert_load from the step's routing statistics (one read-back),
  // and their share of the loss.
  void add_router_losses(LossStats& stats) const;
  // h as float32 (the router reads it so): a.h itself, or its copy in act.h_wide.
  const Tensor& router_input(Activations& act, LayerActivations& a);
  int64_t vocab_first() const { return shard_.rank * local_vocab(); }
  bool sharded() const { return shard_.size > 1; }

  ModelConfig config_;
  Device device_;
  ModelShard shard_;
  std::vector<ParamInfo> info_;
  Tensor params_, grads_;
  Weights weights_, weight_grads_;
  // What the GEMMs and the embedding lookup read: the parameters themselves (fp32), or their
  // bf16-rounded copy (bf16).
  Precision precision_ = Precision::FP32;
  DType storage_ = DType::F32;
  Tensor gemm_params_;
  Weights gemm_weights_;
  WeightFormat weight_format_ = WeightFormat::F32;
  CompactWeights compact_;
  Tensor rope_cos_, rope_sin_;
  Activations act_, infer_;
  // forward_cached's device work (the layers and the logits), replayed as a CUDA graph while
  // what it was recorded for stays the same (recorded_for_): the rows, the logits rows, the
  // cache, the activations' dtype and the kernel choice. Not for sparse layers: their GEMMs are
  // sized by each step's routing.
  Recording decode_recording_;
  std::tuple<int64_t, int64_t, uint64_t, DType, KernelChoice> recorded_for_{};
};

}  // namespace palmcore
