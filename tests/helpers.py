"""Shared test helpers: random parameters and tokens, a relative error, tiny configurations."""

from __future__ import annotations

import numpy as np

from palmcore.config import PaLMConfig


def init_std(name: str, shape) -> float:
    """The spec's init std: embed 1; a dense kernel [in, out] fan-in in^-1/2."""
    if name == "embed":
        return 1.0
    return shape[0] ** -0.5


def random_params(cfg, seed) -> dict:
    """{spec name: float64 array}, deterministic in seed.

    Weights ~ normal with the spec's init std; norm scales are 1 + 0.2 N(0, 1) rather than
    the spec's ones, so that tests exercise them."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in cfg.param_shapes().items():
        if name.endswith("norm.scale"):
            params[name] = 1.0 + 0.2 * rng.standard_normal(shape)
        else:
            params[name] = init_std(name, shape) * rng.standard_normal(shape)
    return params


def random_tokens(cfg, B, T, seed) -> np.ndarray:
    """int64 [B, T] uniform in [0, vocab_size), deterministic in seed."""
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(B, T), dtype=np.int64)


def rel_err(a, b) -> float:
    """||a - b||_2 / max(||b||_2, tiny), Frobenius norm over the whole array."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm((a - b).ravel())
                 / max(np.linalg.norm(b.ravel()), np.finfo(np.float64).tiny))


def tiny_configs() -> list:
    """Tiny configurations covering multi-query (Hkv = 1), grouped (1 < Hkv < H) and
    multi-head (Hkv = H) attention, head_dim != D / H, and odd sizes. z_loss is 1e-2 so
    that the z-loss term matters in gradient checks."""
    return [
        # multi-query, head_dim 4 != D/H = 3, odd vocab
        PaLMConfig(vocab_size=37, d_model=12, n_layers=2, n_heads=4, n_kv_heads=1,
                   head_dim=4, ffn_dim=20, max_seq_len=16, z_loss=1e-2),
        # grouped: 2 kv heads, 3 query heads each; head_dim 6 != D/H = 5/3
        PaLMConfig(vocab_size=29, d_model=10, n_layers=1, n_heads=6, n_kv_heads=2,
                   head_dim=6, ffn_dim=14, max_seq_len=16, z_loss=1e-2, rope_base=100.0),
        # classic multi-head, head_dim = D/H = 4, larger eps
        PaLMConfig(vocab_size=23, d_model=12, n_layers=2, n_heads=3, n_kv_heads=3,
                   ffn_dim=18, max_seq_len=16, z_loss=1e-2, norm_eps=1e-3),
        # grouped 4 -> 2, head_dim 2, wider MLP
        PaLMConfig(vocab_size=31, d_model=8, n_layers=1, n_heads=4, n_kv_heads=2,
                   head_dim=2, ffn_dim=24, max_seq_len=16, z_loss=1e-2),
    ]


def tiny_run_settings(corpus, out, **changes):
    """TrainSettings of a tiny run (a 1-layer model, 8 steps of 2 x 16 tokens) on ``corpus``."""
    from palmcore.train import TrainSettings  # noqa: PLC0415

    base = dict(corpus=[corpus], out=str(out), vocab_size=300, preset="seed",
                overrides=dict(d_model=32, n_layers=1, n_heads=2, head_dim=16, ffn_dim=64),
                batch_size=2, seq_len=16, steps=8, eval_every=4, eval_batches=2,
                checkpoint_every=4, seed=0, progress=False, sample_tokens=5)
    return TrainSettings(**{**base, **changes})
