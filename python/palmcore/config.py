"""PaLMConfig: the model's shape, as in PALM_SPEC.md ("Configuration"), and its presets."""

from __future__ import annotations

import dataclasses
import json

from palmcore import checks

# Shapes from PALM_SPEC.md: `seed` is the seed article's example code, the rest are the
# PaLM paper's Table 1 (for planning and accounting, not for training on a CPU).
_PRESETS = {
    "seed": dict(vocab_size=10000, d_model=256, n_layers=6, n_heads=8, head_dim=32,
                 ffn_dim=1024, n_kv_heads=1),
    # the seed preset with sparse activation (PALM_SPEC "Sparse activation"): every other MLP is
    # 8 experts of the dense width, each token routed to 2
    "seed-moe": dict(vocab_size=10000, d_model=256, n_layers=6, n_heads=8, head_dim=32,
                     ffn_dim=1024, n_kv_heads=1, n_experts=8, expert_top_k=2, moe_every=2),
    "palm-8b": dict(vocab_size=256000, d_model=4096, n_layers=32, n_heads=16, head_dim=256,
                    ffn_dim=16384, n_kv_heads=1),
    "palm-62b": dict(vocab_size=256000, d_model=8192, n_layers=64, n_heads=32, head_dim=256,
                     ffn_dim=32768, n_kv_heads=1),
    "palm-540b": dict(vocab_size=256000, d_model=18432, n_layers=118, n_heads=48, head_dim=256,
                      ffn_dim=73728, n_kv_heads=1),
}


@dataclasses.dataclass
class PaLMConfig:
    """The shape of a PaLM model. ``head_dim`` defaults to ``d_model // n_heads``, ``ffn_dim``
    to ``4 * d_model`` and ``expert_ffn_dim`` to ``ffn_dim``; every field is checked on
    construction. ``n_experts > 0`` makes every ``moe_every``-th MLP (layer i with
    i % moe_every == moe_every - 1) a mixture of that many SwiGLU experts, each token routed to
    ``expert_top_k`` of them (PALM_SPEC "Sparse activation")."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int = 1
    head_dim: int | None = None
    ffn_dim: int | None = None
    max_seq_len: int = 2048
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    z_loss: float = 1e-4
    n_experts: int = 0
    expert_top_k: int = 2
    expert_ffn_dim: int | None = None
    moe_every: int = 1
    router_aux_loss: float = 1e-2
    router_z_loss: float = 1e-3

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
            _extent(name, getattr(self, name))
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"d_model ({self.d_model}) is not divisible by n_heads "
                                 f"({self.n_heads}); give head_dim explicitly")
            self.head_dim = self.d_model // self.n_heads
        if self.ffn_dim is None:
            self.ffn_dim = 4 * self.d_model
        _extent("head_dim", self.head_dim)
        _extent("ffn_dim", self.ffn_dim)
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE's rotate-half, got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                             f"({self.n_kv_heads})")
        # rope_base is any positive number; norm_eps and z_loss are used as float32, so they
        # stay where float32 represents them.
        checks.real("rope_base", self.rope_base, low=0.0, low_open=True)
        checks.real("norm_eps", self.norm_eps, 1e-30, 1e3)
        checks.real("z_loss", self.z_loss, 0.0, 1e3)
        checks.integer("n_experts", self.n_experts, 0, 4096)
        if self.expert_ffn_dim is None:
            self.expert_ffn_dim = self.ffn_dim
        _extent("expert_ffn_dim", self.expert_ffn_dim)
        _extent("moe_every", self.moe_every)
        checks.integer("expert_top_k", self.expert_top_k, 1, checks.INT32_MAX)
        if self.n_experts and self.expert_top_k > self.n_experts:
            raise ValueError(f"expert_top_k ({self.expert_top_k}) must be at most n_experts ({self.n_experts})")
        checks.real("router_aux_loss", self.router_aux_loss, 0.0, 1e3)
        checks.real("router_z_loss", self.router_z_loss, 0.0, 1e3)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len",
                     "head_dim", "ffn_dim", "n_experts", "expert_top_k", "expert_ffn_dim", "moe_every"):
            setattr(self, name, int(getattr(self, name)))
        self.rope_base = float(self.rope_base)
        self.norm_eps = float(self.norm_eps)
        self.z_loss = float(self.z_loss)
        self.router_aux_loss = float(self.router_aux_loss)
        self.router_z_loss = float(self.router_z_loss)

    def is_sparse(self, layer: int) -> bool:
        """Whether layer ``layer``'s MLP is a mixture of experts."""
        return self.n_experts > 0 and layer % self.moe_every == self.moe_every - 1

    @property
    def n_sparse_layers(self) -> int:
        return self.n_layers // self.moe_every if self.n_experts else 0

    @classmethod
    def preset(cls, name: str, **overrides) -> "PaLMConfig":
        """A named preset (``seed``, ``seed-moe``, ``palm-8b``, ``palm-62b``, ``palm-540b``), with
        overrides."""
        if name not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(_PRESETS))}")
        return cls(**{**_PRESETS[name], **overrides})

    @staticmethod
    def presets() -> list[str]:
        return list(_PRESETS)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter's spec name and shape, in the spec's order."""
        V, D, F = self.vocab_size, self.d_model, self.ffn_dim
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        shapes = {"embed": (V, D)}
        for i in range(self.n_layers):
            p = f"layers.{i}."
            shapes[p + "norm.scale"] = (D,)
            shapes[p + "attn.wq"] = (D, q_width)
            shapes[p + "attn.wk"] = (D, kv_width)
            shapes[p + "attn.wv"] = (D, kv_width)
            shapes[p + "attn.wo"] = (q_width, D)
            if self.is_sparse(i):
                E, Fe = self.n_experts, self.expert_ffn_dim
                shapes[p + "mlp.router"] = (D, E)
                shapes[p + "mlp.experts.w_gate"] = (E, D, Fe)
                shapes[p + "mlp.experts.w_up"] = (E, D, Fe)
                shapes[p + "mlp.experts.w_down"] = (E, Fe, D)
            else:
                shapes[p + "mlp.w_gate"] = (D, F)
                shapes[p + "mlp.w_up"] = (D, F)
                shapes[p + "mlp.w_down"] = (F, D)
        shapes["final_norm.scale"] = (D,)
        return shapes

    def num_params(self) -> int:
        """Parameter count N (the embedding is counted once: it is tied): the sum of
        param_shapes(), counted without listing every layer; every expert counts."""
        return self._count(self.n_experts)

    def num_active_params(self) -> int:
        """Parameters one token uses: as num_params, with expert_top_k experts per sparse layer
        (and its router) instead of all of them."""
        return self._count(self.expert_top_k)

    def _count(self, experts: int) -> int:
        V, D, F, Fe = self.vocab_size, self.d_model, self.ffn_dim, self.expert_ffn_dim
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        attention = D + D * q_width + 2 * D * kv_width + q_width * D
        sparse = self.n_sparse_layers
        mlp = (self.n_layers - sparse) * 3 * D * F + sparse * (D * self.n_experts + experts * 3 * D * Fe)
        return V * D + self.n_layers * attention + mlp + D

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token, as in the PaLM paper (appendix B): 6N + 12·L·H·dh·T, with N
        the active parameters (num_active_params: a sparse layer runs k experts per token)."""
        _extent("seq_len", seq_len)
        return 6 * self.num_active_params() + 12 * self.n_layers * self.n_heads * self.head_dim * seq_len

    def kv_cache_bytes(self, slots: int, positions: int) -> int:
        """Bytes of a float32 key/value cache: keys and values of n_kv_heads heads per layer
        for ``slots`` sequences of ``positions`` tokens."""
        _extent("slots", slots)
        _extent("positions", positions)
        return 2 * self.n_layers * slots * positions * self.n_kv_heads * self.head_dim * 4

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict) -> "PaLMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(fields) - known
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(sorted(unknown))}")
        return cls(**fields)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _extent(name: str, value) -> None:
    """A size: a positive integer that fits a 32-bit BLAS dimension."""
    checks.integer(name, value, 1, checks.INT32_MAX)
