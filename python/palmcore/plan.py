"""The planner: what one device holds, computes and sends per training step on a mesh.

For a configuration on a mesh of ``data`` x ``model`` devices, with PALM_SPEC.md's sharded
layout (embed by vocabulary rows; wq, w_gate, w_up by output columns; wo, w_down by input
rows; wk, wv and the norm scales replicated), the optimizer state sharded over the data axis,
and this runtime's float32 storage and training activations (csrc/model.cpp), ``plan``
returns per device:

- parameter, gradient and optimizer-state bytes;
- activation bytes kept for the backward pass, with and without rematerialization (remat
  keeps each layer's input and recomputes the layer in the backward pass);
- model FLOPs per step (the PaLM paper's 6N + 12·L·H·dh·T per token) and hardware FLOPs
  (one more forward pass with remat);
- the bytes each collective sends per step (ring algorithms: an all-reduce of S bytes over n
  ranks sends 2(n-1)/n·S per rank, a reduce-scatter or all-gather (n-1)/n·S; with remat the
  forward all-reduces run twice);
- the step time and tokens/s implied by a peak rate and a model FLOPs utilization (MFU).
"""

from __future__ import annotations

import dataclasses
import math

from palmcore import checks
from palmcore.config import PaLMConfig

FLOAT_BYTES = 4          # this runtime stores parameters, gradients, state and activations in float32
OPTIMIZER_STATES = 2     # Adafactor (unfactored, with momentum) and AdamW both keep m and v


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """The shape of a mesh of ``data`` x ``model`` devices: tensor parallel over ``model``,
    data parallel over ``data`` (palmcore.Mesh is such a mesh over real ranks)."""

    data: int = 1
    model: int = 1

    def __post_init__(self):
        for axis in ("data", "model"):
            value = getattr(self, axis)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"mesh axis '{axis}' must be a positive integer, got {value!r}")

    @property
    def size(self) -> int:
        return self.data * self.model

    @classmethod
    def parse(cls, text: str) -> "MeshShape":
        """``"data=2,model=4"`` (either axis may be left out: it is then 1)."""
        axes = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, value = part.partition("=")
            if not sep or name not in ("data", "model") or name in axes:
                raise ValueError(f"a mesh is written data=D,model=M; got {text!r}")
            try:
                axes[name] = int(value)
            except ValueError:
                raise ValueError(f"mesh axis '{name}' must be an integer, got {value!r}") from None
        return cls(**axes)

    def check(self, cfg: PaLMConfig, vocab: bool = True) -> None:
        """Raises ValueError unless the model axis divides every split dimension (the heads,
        the MLP's hidden units and, unless ``vocab`` is False, the vocabulary)."""
        M = self.model
        extents = [("n_heads", cfg.n_heads), ("ffn_dim", cfg.ffn_dim)] + ([("vocab_size", cfg.vocab_size)] if vocab else [])
        extents += [("n_experts", cfg.n_experts)] if cfg.n_experts else []
        for name, extent in extents:
            if extent % M:
                raise ValueError(f"the model axis ({M}) must divide {name} ({extent})")


@dataclasses.dataclass(frozen=True)
class Plan:
    config: PaLMConfig
    mesh: MeshShape
    vocab_shard: int            # embedding rows per model rank (the vocabulary padded to M·vocab_shard)
    batch: int                  # sequences per step, over the whole mesh
    seq: int
    params: int                 # elements on one device
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int       # kept for the backward pass, without remat
    activation_bytes_remat: int
    model_flops: float          # per device per step
    hardware_flops_remat: float
    collectives: dict           # name -> bytes sent per device per step
    step_seconds: float
    tokens_per_second: float
    peak_flops: float
    mfu: float

    def table(self) -> str:
        c, m = self.config, self.mesh
        gib = 2.0**30
        rows = [
            ("mesh", f"data={m.data} x model={m.model} = {m.size} devices"),
            ("model", f"{c.num_params() / 1e9:,.2f}B parameters"
                      + (f" ({c.num_active_params() / 1e9:,.2f}B active: {c.expert_top_k} of {c.n_experts} experts "
                         f"in {c.n_sparse_layers} sparse layers)" if c.n_experts else "")
                      + f"; {self.batch} x {self.seq} tokens per step"),
            ("vocabulary shard", f"{self.vocab_shard:,} rows per model rank"
                                 + (f" (vocabulary padded {c.vocab_size:,} -> {self.vocab_shard * m.model:,})"
                                    if self.vocab_shard * m.model != c.vocab_size else "")),
            ("parameters / device", f"{self.params / 1e9:,.3f}B = {self.param_bytes / gib:,.2f} GiB"),
            ("gradients / device", f"{self.grad_bytes / gib:,.2f} GiB"),
            ("optimizer state / device", f"{self.optimizer_bytes / gib:,.2f} GiB (sharded over data)"),
            ("activations / device", f"{self.activation_bytes / gib:,.2f} GiB, "
                                     f"{self.activation_bytes_remat / gib:,.2f} GiB with remat"),
            ("model FLOPs / device / step", f"{self.model_flops:.4g} (with remat {self.hardware_flops_remat:.4g})"),
        ]
        rows += [(f"  {name}", f"{sent / gib:,.3f} GiB sent per device per step")
                 for name, sent in self.collectives.items()]
        rows += [("step time", f"{self.step_seconds:,.3f} s at {self.peak_flops / 1e12:g} TFLOP/s peak and "
                               f"{self.mfu:.1%} MFU"),
                 ("throughput", f"{self.tokens_per_second:,.0f} tokens/s")]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def activations_per_token(cfg: PaLMConfig, mesh: MeshShape) -> tuple[int, int, int]:
    """(floats kept per token for each dense layer, for each sparse layer, and outside the
    layers) of the training step's activations (csrc/model.cpp, Model::prepare and
    layer_activations) on one model shard. A sparse layer keeps k rows per token: the gathered
    inputs, gate, up and the experts' outputs (at most; a shard holds its experts' share)."""
    D, dh = cfg.d_model, cfg.head_dim
    heads, ffn = cfg.n_heads // mesh.model, cfg.ffn_dim // mesh.model
    kv = cfg.n_kv_heads * dh
    attention = D + 1 + D + heads * dh + 2 * kv + heads * dh + heads        # xhat rstd h q k v attn lse
    dense = attention + 2 * ffn                                               # gate up
    E, k, Fe = cfg.n_experts, cfg.expert_top_k, cfg.expert_ffn_dim
    sparse = attention + E + 1 + 4 * k + k * (2 * Fe + 2 * D)  # probs lse experts weights order slot_of; gate up x y
    outside = (D                       # x
               + D + 1 + D             # final xhat, rstd, h
               + 3 * D                 # dx, dh, dfinal_h
               + 2 * heads * dh        # dattn, dq
               + 2 * kv                # dk, dv
               + 4 * ffn)              # swiglu, dswiglu, dgate, dup
    if E:  # the sparse layers' scratch: router logits and gradients, the experts' a and gradients
        outside += 3 * E + k + k * (4 * Fe + 2 * D)
    return dense, sparse, outside


def plan(cfg: PaLMConfig, mesh: MeshShape, batch: int, seq: int, peak_flops: float = 275e12,
         mfu: float = 0.462) -> Plan:
    """The per-device plan of one training step (see the module's docstring). Defaults: a TPU
    v4 chip's bf16 peak and the MFU the PaLM paper reports for PaLM 540B."""
    mesh.check(cfg, vocab=False)
    for name, value in (("batch", batch), ("seq", seq)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if batch % mesh.data:
        raise ValueError(f"the data axis ({mesh.data}) must divide the batch ({batch})")
    if seq > cfg.max_seq_len:
        raise ValueError(f"seq {seq} > max_seq_len {cfg.max_seq_len}")
    checks.real("peak_flops", peak_flops, low=0.0, low_open=True)
    checks.real("mfu", mfu, 0.0, 1.0, low_open=True)
    M, Dp, L, D = mesh.model, mesh.data, cfg.n_layers, cfg.d_model
    # The vocabulary is padded to a multiple of the model axis (PaLM's 256k over 12 ways needs
    # it); the padded rows are never looked up and are masked out of the softmax.
    vocab_shard = -(-cfg.vocab_size // M)
    S = cfg.n_sparse_layers
    replicated_per_layer = D + 2 * D * cfg.n_kv_heads * cfg.head_dim     # norm, wk, wv
    attention_split = 2 * D * cfg.n_heads * cfg.head_dim                # wq, wo
    dense_split = attention_split + 3 * D * cfg.ffn_dim                  # + w_gate, w_up, w_down
    sparse_split = attention_split + 3 * cfg.n_experts * D * cfg.expert_ffn_dim  # + the experts
    params = (vocab_shard * D + D + (L - S) * (dense_split // M + replicated_per_layer)
              + S * (sparse_split // M + replicated_per_layer + D * cfg.n_experts))  # + the routers

    tokens_local = batch // Dp * seq
    dense_layer, sparse_layer, outside = activations_per_token(cfg, mesh)
    logits_chunk = min(tokens_local, max(64, (16 << 20) // vocab_shard)) * vocab_shard
    common = (outside * tokens_local + logits_chunk) * FLOAT_BYTES
    kept = (L - S) * dense_layer + S * sparse_layer
    activation_bytes = kept * tokens_local * FLOAT_BYTES + common
    activation_bytes_remat = (L * D + max(dense_layer, sparse_layer if S else 0)) * tokens_local * FLOAT_BYTES + common

    flops_per_token = cfg.flops_per_token(seq)
    model_flops = flops_per_token * batch * seq / mesh.size
    hardware_flops_remat = model_flops * 4 / 3                           # one more forward pass

    def all_reduce(n, size):
        return 2 * (n - 1) / n * size

    def scatter_or_gather(n, size):
        return (n - 1) / n * size

    act = tokens_local * D * FLOAT_BYTES
    collectives = {
        "model all-reduce, forward (embedding + one per layer)": all_reduce(M, (L + 1) * act),
        "model all-reduce, backward (one per layer + logits)": all_reduce(M, (L + 1) * act),
        "model all-reduce, vocab-parallel loss (max, sum, target)": all_reduce(M, 3 * tokens_local * FLOAT_BYTES),
        "model all-reduce, wk/wv gradients": all_reduce(M, L * 2 * D * cfg.n_kv_heads * cfg.head_dim * FLOAT_BYTES),
        **({"model all-reduce, routers' probability gradients": all_reduce(M, S * tokens_local * cfg.n_experts *
                                                                          FLOAT_BYTES)} if S else {}),
        "data reduce-scatter, gradients": scatter_or_gather(Dp, params * FLOAT_BYTES),
        "data all-gather, parameters": scatter_or_gather(Dp, params * FLOAT_BYTES),
    }
    step_seconds = model_flops / (peak_flops * mfu)
    return Plan(cfg, mesh, vocab_shard, batch, seq, params, params * FLOAT_BYTES, params * FLOAT_BYTES,
                OPTIMIZER_STATES * math.ceil(params / Dp) * FLOAT_BYTES, activation_bytes,
                activation_bytes_remat, model_flops, hardware_flops_remat, collectives, step_seconds,
                batch * seq / step_seconds, peak_flops, mfu)
