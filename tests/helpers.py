"""Shared test helpers: random parameters and tokens, the error measure (scaled_err), tiny
configurations, the MPI launcher."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from palmcore.config import PaLMConfig


def init_std(name: str, shape) -> float:
    """The spec's init std: embed 1; a dense kernel [in, out] fan-in in^-1/2 (an expert tensor
    [E, in, out] likewise)."""
    if name == "embed":
        return 1.0
    return (shape[1] if len(shape) == 3 else shape[0]) ** -0.5


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


def scaled_err(a, b, floor: float) -> float:
    """The one error measure of the tests: max|a - b| / max(max|b|, floor).

    ``a`` is the result under test, ``b`` the reference (same shape); the largest absolute
    error over the whole array, relative to the larger of the reference's own scale (its
    largest magnitude) and ``floor``.

    Why a floor: rounding error is relative to the size of the terms a result is computed
    from, not to the result, which can cancel to (near) zero. The plain ratio
    ||a - b|| / ||b|| then divides rounding noise by a tiny norm: with T = 1 attention sees one
    key, the gradient with respect to the queries is exactly 0 in float64 and float32 noise
    gave a "relative error" of 2.4e+299 for a correct result. ``floor`` is a stated scale of the
    quantity that does not vanish when the reference does: the size of its summands (|A|·|B|
    for a matmul, the inputs of a kernel), the largest of the sibling outputs of the same
    computation (for one gradient tensor: the largest gradient entry over all parameters), or
    an absolute unit of the quantity (1 nat for a loss, 1 for probabilities). It must be > 0
    and finite, so the measure is never a division by (almost) nothing.

    Why it still fails on a wrong result: a wrong value is wrong by the order of the quantity
    itself, and a floor is a scale of the quantity, at most a small factor above it (|A|·|B| is
    a few times |A·B| for the tests' random data; the largest gradient entry over all
    parameters is within ~20x of every non-degenerate tensor's), so the measure of a wrong
    result is then far above the tolerances of 1e-4 and below. tests/test_helpers.py checks
    both sides: noise on an exactly-zero reference passes, an error of 1 % fails.
    Why the max norm rather than Frobenius: one wrong element among many is not averaged away.
    NaN or inf in ``a`` gives NaN or inf, which fails every ``<= tol``. Empty arrays give 0.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    floor = float(floor)
    assert 0.0 < floor < np.inf, f"the floor must be a positive finite scale, not {floor!r}"
    if a.size == 0:
        return 0.0
    diff = np.abs(a - b)
    if not np.all(np.isfinite(diff)):
        return float("nan") if np.isnan(diff).any() else float("inf")
    return float(diff.max() / max(float(np.abs(b).max()), floor))


def max_abs(*arrays) -> float:
    """The largest magnitude over all the given arrays (or dicts of arrays): a floor for
    scaled_err from the sibling outputs of one computation."""
    out = 0.0
    for x in arrays:
        for v in (x.values() if isinstance(x, dict) else [x]):
            v = np.asarray(v, dtype=np.float64)
            if v.size:
                out = max(out, float(np.abs(v).max()))
    return out


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
    from palmcore.training import TrainSettings  # noqa: PLC0415

    base = dict(corpus=[corpus], out=str(out), vocab_size=300, preset="seed",
                overrides=dict(d_model=32, n_layers=1, n_heads=2, head_dim=16, ffn_dim=64),
                batch_size=2, seq_len=16, steps=8, eval_every=4, eval_batches=2,
                checkpoint_every=4, seed=0, progress=False, sample_tokens=5)
    return TrainSettings(**{**base, **changes})


def mpiexec() -> str:
    """The launcher of the MPICH the `mpi` extra installs (next to this Python), else PATH's."""
    found = os.path.join(sys.prefix, "bin", "mpiexec")
    found = found if os.path.exists(found) else shutil.which("mpiexec")
    if found is None:
        pytest.skip("no mpiexec: install palmcore with the mpi extra (mpi4py, mpich)")
    return found


def start_server(run: str, *flags: str, timeout: float = 120.0) -> tuple[subprocess.Popen, int]:
    """`palmcore serve --checkpoint run` with `flags` on a free port, once /health answers:
    (the process, its stderr a text pipe; the port). The caller stops it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "palmcore", "serve", "--checkpoint", run, "--port", str(port),
                             *flags], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"palmcore serve exited: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc, port
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"palmcore serve did not answer /health within {timeout} s") from None
            time.sleep(0.05)


def norm_scales_off_one(model, seed: int):
    """model with its norm scales set to 1 + 0.3 N(0, 1) (deterministic in seed), so that a
    misplaced or dropped scale shows; returns the model."""
    state = model.state_dict()
    rng = np.random.default_rng(seed)
    for name in state:
        if name.endswith("norm.scale"):
            state[name] = (1 + 0.3 * rng.standard_normal(state[name].shape)).astype(np.float32)
    model.load_state_dict(state)
    return model
