// The ops the PaLM graph is written in: one declaration per op, forward and backward together.
// Each op checks nothing about Python and dispatches once on its tensors' device (ops.cpp) to
// the backend's kernel of the same name (cpu/*.cpp; a CUDA backend adds cuda/*.cu).
//
// Conventions: activations are 2-D [rows, width] with rows = batch · seq in row-major order
// (row = b·T + t); "accumulated" outputs are added to, never overwritten.
#pragma once

#include "palmcore/tensor.h"

namespace palmcore {

// C = alpha · op(A) @ op(B) + beta · C, op = transpose when asked. All 2-D, row-major.
void matmul(const Tensor& a, bool transpose_a, const Tensor& b, bool transpose_b, Tensor& c,
            float alpha = 1.0f, float beta = 0.0f);

// out[r] = table[tokens[r]]
void embedding_forward(const Tensor& table, const Tensor& tokens, Tensor& out);
// dtable[tokens[r]] += dout[r]            (accumulated, in row order: deterministic)
void embedding_backward(const Tensor& dout, const Tensor& tokens, Tensor& dtable);

// Scale-only LayerNorm over the last axis:
//   xhat = (x - mean(x)) · rstd,  rstd = 1 / sqrt(var(x) + eps),  out = xhat · scale
// Keeps xhat and rstd for the backward pass.
void layernorm_forward(const Tensor& x, const Tensor& scale, float eps, Tensor& out, Tensor& xhat,
                       Tensor& rstd);
// dxhat = dout · scale
// dx    += rstd · (dxhat - mean(dxhat) - xhat · mean(dxhat · xhat))      (accumulated)
// dscale += Σ_rows dout · xhat                                           (accumulated)
void layernorm_backward(const Tensor& dout, const Tensor& xhat, const Tensor& rstd,
                        const Tensor& scale, Tensor& dx, Tensor& dscale);

// RoPE, rotate-half, in place on x [rows, heads · dh] at positions[row]:
//   (x1, x2) -> (x1 cos θ - x2 sin θ, x2 cos θ + x1 sin θ),  θ_i = p · base^(-2i/dh)
// `inverse` rotates by -θ: the rotation is orthogonal, so that is also its backward pass.
// cos_table / sin_table: [max_seq_len, dh / 2].
void rope_apply(Tensor& x, const Tensor& positions, const Tensor& cos_table,
                const Tensor& sin_table, int64_t heads, bool inverse);

// Causal multi-query / grouped attention. q: [B·T, H·dh], k, v: [B·T, Hkv·dh];
// query head j reads key/value head j / (H / Hkv).
//   out_i = Σ_{j ≤ i} softmax_j(q_i · k_j / sqrt(dh)) v_j,   lse_i = log Σ_{j ≤ i} exp(q_i·k_j/sqrt(dh))
// Works a block of queries at a time: no [B, H, T, T] tensor is ever held.
struct AttentionShape {
  int64_t batch, seq, heads, kv_heads, head_dim;
};
// Backward workspace: partial key/value gradients, one slice per query head, summed per group.
struct AttentionWorkspace {
  Tensor dkeys_part, dvalues_part;  // [B·H, T, dh]
  static AttentionWorkspace create(const AttentionShape& shape, Device device);
};
void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out, Tensor& lse,
                       const AttentionShape& shape, AttentionWorkspace& ws);
// With p_ij = exp(s_ij - lse_i), D_i = dout_i · out_i, ds_ij = p_ij (dout_i · v_j - D_i):
//   dq_i = Σ_j ds_ij k_j / sqrt(dh),  dk_j = Σ_i ds_ij q_i / sqrt(dh),  dv_j = Σ_i p_ij dout_i
// dq, dk, dv are overwritten.
void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                        const Tensor& lse, const Tensor& dout, Tensor& dq, Tensor& dk, Tensor& dv,
                        const AttentionShape& shape, AttentionWorkspace& ws);

// SwiGLU: out = silu(gate) · up, silu(u) = u · σ(u)
void swiglu_forward(const Tensor& gate, const Tensor& up, Tensor& out);
// dgate = dout · up · σ(g) · (1 + g · (1 - σ(g))),  dup = dout · silu(g)   (overwritten)
void swiglu_backward(const Tensor& gate, const Tensor& up, const Tensor& dout, Tensor& dgate,
                     Tensor& dup);

// Cross-entropy with z-loss, forward and backward in one pass over logits z [rows, V]:
//   lse = log Σ exp(z),  ce = lse - z[y],  loss_row = ce + z_loss · lse²
//   dz = grad_scale · (softmax(z) · (1 + 2 · z_loss · lse) - onehot(y))
// Rows with target < 0 are ignored (dz = 0, row_ce = row_lse = 0). z is overwritten by dz.
void cross_entropy_forward_backward(Tensor& logits, const Tensor& targets, float z_loss,
                                    float grad_scale, Tensor& row_ce, Tensor& row_lse);

}  // namespace palmcore
