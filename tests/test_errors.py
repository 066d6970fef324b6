"""Bad input to palmcore raises a Python exception (ValueError or TypeError) whose message
names the problem; nothing crashes the interpreter, and a rejected call changes nothing
(parameters and accumulated gradients stay as they were)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

import palmcore
from palmcore import PaLM, PaLMConfig, _core

from helpers import random_params, random_tokens

CFG = PaLMConfig(vocab_size=37, d_model=12, n_layers=2, n_heads=4, n_kv_heads=1,
                 head_dim=4, ffn_dim=20, max_seq_len=16, z_loss=1e-2)
V = CFG.vocab_size


@pytest.fixture
def model():
    m = PaLM(CFG, seed=0)
    m.load_state_dict({n: w.astype(np.float32) for n, w in random_params(CFG, 1).items()})
    return m


def snapshot(m):
    return m.state_dict(), m.grads()


def assert_unchanged(m, snap):
    state, grads = snap
    for name, w in m.state_dict().items():
        assert np.array_equal(w, state[name]), f"parameter {name} changed"
    for name, g in m.grads().items():
        assert np.array_equal(g, grads[name]), f"gradient {name} changed"


def good_batch(B=2, T=5):
    return random_tokens(CFG, B, T, seed=2), random_tokens(CFG, B, T, seed=3)


# --------------------------------------------------------------------------- tokens, targets

BAD_TOKENS = [
    # (tokens, exception, message regex)
    (np.array([[0, 1, -1]]), ValueError, r"tokens id -1 .*outside the vocabulary \[0, 37\)"),
    (np.array([[0, V, 1]]), ValueError, r"tokens id 37 .*outside the vocabulary \[0, 37\)"),
    (np.array([[0, 1], [2, 10**6]]), ValueError, r"tokens id 1000000 .*outside the vocabulary"),
    (np.array([[0, 2**40]]), ValueError, r"tokens holds ids outside the int32 range"),
    (np.array([[0, -(2**40)]]), ValueError, r"tokens holds ids outside the int32 range"),
    (np.array([[0, 2**63]], dtype=np.uint64), ValueError, r"int32 range"),
    (np.array([[0.0, 1.0]]), TypeError, r"tokens must be an integer array, got dtype float64"),
    (np.array([[0, 1]], dtype=np.float32), TypeError, r"tokens must be an integer array.*float32"),
    (np.array([[True, False]]), TypeError, r"tokens must be an integer array, got dtype bool"),
    (np.array([["a", "b"]]), TypeError, r"tokens must be an integer array"),
    (np.array([[0, None]], dtype=object), TypeError, r"tokens must be an integer array.*object"),
    ([[0, 1.5]], TypeError, r"tokens must be an integer array"),
    (np.array([0, 1, 2]), ValueError, r"tokens must be 2-D \[batch, seq\], got shape \(3,\)"),
    (np.array(3), ValueError, r"tokens must be 2-D \[batch, seq\], got shape \(\)"),
    (np.zeros((2, 3, 4), np.int64), ValueError, r"tokens must be 2-D \[batch, seq\], got shape \(2, 3, 4\)"),
    (np.zeros((2, 17), np.int64), ValueError, r"sequence length 17 > max_seq_len 16"),
    (np.zeros((1, 1000), np.int64), ValueError, r"sequence length 1000 > max_seq_len 16"),
    (np.zeros((0, 5), np.int64), ValueError, r"tokens must not be empty"),
    (np.zeros((2, 0), np.int64), ValueError, r"tokens must not be empty"),
]
BAD_TOKEN_IDS = ["negative", "eq-V", "huge", "over-int32", "under-int32", "uint64-huge",
                 "float64", "float32", "bool", "str", "object", "list-float", "1-D", "0-D",
                 "3-D", "T>max", "T>>max", "empty-B", "empty-T"]


@pytest.mark.parametrize("tokens,exc,match", BAD_TOKENS, ids=BAD_TOKEN_IDS)
def test_bad_tokens_in_forward(model, tokens, exc, match):
    snap = snapshot(model)
    with pytest.raises(exc, match=match):
        model.forward(tokens)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("tokens,exc,match", BAD_TOKENS, ids=BAD_TOKEN_IDS)
def test_bad_tokens_in_forward_backward(model, tokens, exc, match):
    model.forward_backward(*good_batch())            # some gradient to keep
    snap = snapshot(model)
    targets = np.zeros(np.shape(tokens), np.int64) if np.ndim(tokens) == 2 else np.zeros((1, 1), np.int64)
    with pytest.raises(exc, match=match.replace("tokens", "(tokens|targets)")):
        model.forward_backward(tokens, targets)
    assert_unchanged(model, snap)


BAD_TARGETS = [
    (lambda t: np.full(t.shape, V), ValueError, r"targets id 37 .*outside the vocabulary \[0, 37\)"),
    (lambda t: np.where(t == t[0, 0], 10**5, t), ValueError, r"targets id 100000 .*outside the vocabulary"),
    (lambda t: t[:, :3], ValueError, r"targets shape \[2, 3\] differs from tokens shape \[2, 5\]"),
    (lambda t: t.T, ValueError, r"targets shape \[5, 2\] differs from tokens shape \[2, 5\]"),
    (lambda t: t[:1], ValueError, r"targets shape .* differs from tokens shape"),
    (lambda t: t.ravel(), ValueError, r"targets must be 2-D \[batch, seq\], got shape \(10,\)"),
    (lambda t: t[None], ValueError, r"targets must be 2-D \[batch, seq\]"),
    (lambda t: t.astype(np.float64), TypeError, r"targets must be an integer array, got dtype float64"),
    (lambda t: t > 3, TypeError, r"targets must be an integer array, got dtype bool"),
    (lambda t: np.full(t.shape, -(2**31) - 1), ValueError, r"targets holds ids outside the int32 range"),
]


@pytest.mark.parametrize("make,exc,match", BAD_TARGETS,
                         ids=["eq-V", "huge", "short", "transposed", "fewer-rows", "1-D", "3-D",
                              "float", "bool", "under-int32"])
def test_bad_targets(model, make, exc, match):
    tokens, targets = good_batch()
    model.forward_backward(tokens, targets)
    snap = snapshot(model)
    with pytest.raises(exc, match=match):
        model.forward_backward(tokens, make(targets))
    assert_unchanged(model, snap)
    # the model still works, and gives what it gave before the failed call
    model.zero_grad()
    assert model.forward_backward(tokens, targets) == palm_result(tokens, targets)


def palm_result(tokens, targets):
    m = PaLM(CFG, seed=0)
    m.load_state_dict({n: w.astype(np.float32) for n, w in random_params(CFG, 1).items()})
    return m.forward_backward(tokens, targets)


def test_model_works_after_errors(model):
    tokens, targets = good_batch(3, 7)
    want_logits = model.forward(tokens)
    want = model.forward_backward(tokens, targets)
    want_grads = model.grads()
    for bad in (np.zeros((2, 17), np.int64), np.array([[V]]), np.zeros((1, 2, 3), np.int64)):
        with pytest.raises(ValueError):
            model.forward(bad)
    model.zero_grad()
    assert np.array_equal(model.forward(tokens), want_logits)
    assert model.forward_backward(tokens, targets) == want
    for name, g in model.grads().items():
        assert np.array_equal(g, want_grads[name]), name


# --------------------------------------------------------------------------- load_state_dict

def _fresh_state():
    """A full, valid state different from the model's (so a partial load would show)."""
    return {n: (w + 0.5).astype(np.float32) for n, w in random_params(CFG, 9).items()}


LAST = "final_norm.scale"   # the last parameter in order: every other one would load first


def _missing(s):
    del s[LAST]


def _missing_first(s):
    del s["embed"]


def _extra(s):
    s["lm_head"] = np.zeros((V, 12), np.float32)


def _renamed(s):
    s["layers.2.norm.scale"] = s.pop("layers.1.norm.scale")


BAD_STATES = [
    (_missing, ValueError, r"missing \['final_norm\.scale'\], unexpected \[\]"),
    (_missing_first, ValueError, r"missing \['embed'\]"),
    (_extra, ValueError, r"missing \[\], unexpected \['lm_head'\]"),
    (_renamed, ValueError, r"missing \['layers\.1\.norm\.scale'\], unexpected \['layers\.2\.norm\.scale'\]"),
    (lambda s: s.update({LAST: np.ones(13, np.float32)}), ValueError,
     r"parameter 'final_norm\.scale' has shape \(13,\), expected \(12,\)"),
    (lambda s: s.update({"layers.1.attn.wk": np.zeros((4, 12), np.float32)}), ValueError,
     r"parameter 'layers\.1\.attn\.wk' has shape \(4, 12\), expected \(12, 4\)"),
    (lambda s: s.update({"embed": s["embed"][None]}), ValueError,
     r"parameter 'embed' has shape \(1, 37, 12\), expected \(37, 12\)"),
    (lambda s: s.update({LAST: np.ones(12, np.float64)}), TypeError,
     r"parameter 'final_norm\.scale' must be a float32 ndarray, got float64"),
    (lambda s: s.update({LAST: np.ones(12, np.float16)}), TypeError, r"must be a float32 ndarray, got float16"),
    (lambda s: s.update({LAST: np.ones(12, np.int32)}), TypeError, r"must be a float32 ndarray, got int32"),
    (lambda s: s.update({LAST: [1.0] * 12}), TypeError, r"'final_norm\.scale' must be a float32 ndarray, got list"),
    (lambda s: s[LAST].__setitem__(3, np.nan), ValueError,
     r"parameter 'final_norm\.scale' holds a non-finite value \(NaN or Inf\)"),
    (lambda s: s[LAST].__setitem__(0, np.inf), ValueError, r"'final_norm\.scale' holds a non-finite value"),
    (lambda s: s["layers.1.mlp.w_down"].__setitem__((5, 2), -np.inf), ValueError,
     r"'layers\.1\.mlp\.w_down' holds a non-finite value"),
]


@pytest.mark.parametrize("corrupt,exc,match", BAD_STATES,
                         ids=["missing", "missing-first", "extra", "renamed", "shape-last",
                              "shape-transposed", "rank", "float64", "float16", "int32", "list",
                              "nan", "inf", "neg-inf"])
def test_bad_load_state_dict_changes_nothing(model, corrupt, exc, match):
    model.forward_backward(*good_batch())
    snap = snapshot(model)
    state = _fresh_state()
    corrupt(state)
    with pytest.raises(exc, match=match):
        model.load_state_dict(state)
    assert_unchanged(model, snap)
    # the same dict without the fault loads fine
    model.load_state_dict(_fresh_state())
    assert np.array_equal(model.state_dict()["embed"], _fresh_state()["embed"])


# --------------------------------------------------------------------------- config

BASE = dict(vocab_size=37, d_model=16, n_layers=2, n_heads=4)   # head_dim 4

BAD_CONFIGS = [
    # (overrides, error, message): TypeError for a value of the wrong kind, ValueError for a
    # value out of range or fields that do not fit together
    (dict(n_kv_heads=3), ValueError, r"n_heads \(4\) must be a multiple of n_kv_heads \(3\)"),
    (dict(n_heads=6, n_kv_heads=4, head_dim=2), ValueError, r"n_heads \(6\) must be a multiple of n_kv_heads \(4\)"),
    (dict(n_kv_heads=8), ValueError, r"n_heads \(4\) must be a multiple of n_kv_heads \(8\)"),
    (dict(head_dim=3), ValueError, r"head_dim must be even.*got 3"),
    (dict(d_model=12, n_heads=12), ValueError, r"head_dim must be even.*got 1"),
    (dict(d_model=10), ValueError, r"d_model \(10\) is not divisible by n_heads \(4\)"),
    (dict(head_dim=0), ValueError, r"head_dim must be in \[1, 2147483647\], got 0"),
    (dict(head_dim=-4), ValueError, r"head_dim must be in \[1, 2147483647\], got -4"),
    (dict(ffn_dim=0), ValueError, r"ffn_dim must be in \[1, 2147483647\], got 0"),
    (dict(ffn_dim=-1), ValueError, r"ffn_dim must be in \[1, 2147483647\], got -1"),
    (dict(rope_base=0.0), ValueError, r"rope_base must be finite and > 0, got 0\.0"),
    (dict(rope_base=float("inf")), ValueError, r"rope_base must be finite and > 0, got inf"),
    (dict(norm_eps=-1e-5), ValueError, r"norm_eps must be in \[1e-30, 1000\], got -1e-05"),
    (dict(norm_eps=float("nan")), ValueError, r"norm_eps must be in \[1e-30, 1000\], got nan"),
    (dict(z_loss=-1e-4), ValueError, r"z_loss must be in \[0, 1000\], got -0.0001"),
    (dict(z_loss=float("inf")), ValueError, r"z_loss must be in \[0, 1000\], got inf"),
    (dict(rope_base="10000"), TypeError, r"rope_base must be a number, got '10000'"),
    (dict(rope_base=True), TypeError, r"rope_base must be a number, got True"),
    (dict(norm_eps=1e-50), ValueError, r"norm_eps must be in \[1e-30, 1000\], got 1e-50"),
    (dict(z_loss=1e39), ValueError, r"z_loss must be in \[0, 1000\], got 1e\+39"),
    (dict(d_model=2**31), ValueError, r"d_model must be in \[1, 2147483647\], got 2147483648"),
]
for _field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
    BAD_CONFIGS += [
        ({_field: 0}, ValueError, rf"{_field} must be in \[1, 2147483647\], got 0"),
        ({_field: -3}, ValueError, rf"{_field} must be in \[1, 2147483647\], got -3"),
        ({_field: 4.0}, TypeError, rf"{_field} must be an integer, got 4\.0"),
        ({_field: True}, TypeError, rf"{_field} must be an integer, got True"),
        ({_field: None}, TypeError, rf"{_field} must be an integer, got None"),
    ]


@pytest.mark.parametrize("overrides,error,match", BAD_CONFIGS,
                         ids=[",".join(f"{k}={v!r}" for k, v in o.items()) for o, _, _ in BAD_CONFIGS])
def test_bad_config(overrides, error, match):
    with pytest.raises(error, match=match):
        PaLMConfig(**{**BASE, **overrides})


def test_unknown_preset_and_fields():
    with pytest.raises(ValueError, match=r"unknown preset 'palm-1t'; known: palm-540b, palm-62b, palm-8b, seed"):
        PaLMConfig.preset("palm-1t")
    with pytest.raises(ValueError, match=r"unknown preset 'Seed'"):
        PaLMConfig.preset("Seed")
    with pytest.raises(ValueError, match=r"n_heads \(8\) must be a multiple of n_kv_heads \(3\)"):
        PaLMConfig.preset("seed", n_kv_heads=3)
    with pytest.raises(ValueError, match=r"unknown config fields: capacity_factor, dropout"):
        PaLMConfig.from_dict({**BASE, "dropout": 0.1, "capacity_factor": 1.25})
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'dropout'"):
        PaLMConfig.preset("seed", dropout=0.1)
    with pytest.raises(ValueError, match=r"seq_len must be in \[1, 2147483647\], got 0"):
        PaLMConfig(**BASE).flops_per_token(0)


def test_bad_model_arguments():
    cfg = PaLMConfig(**BASE)
    with pytest.raises(TypeError, match=r"config must be a PaLMConfig, got str"):
        PaLM("seed")
    with pytest.raises(TypeError, match=r"config must be a PaLMConfig, got dict"):
        PaLM(cfg.to_dict())
    for seed in (-1, 2**64):
        with pytest.raises(ValueError, match=r"seed must be in \[0, 18446744073709551615\], got "):
            PaLM(cfg, seed=seed)
    for seed in (1.0, True, "0", None):
        with pytest.raises(TypeError, match=r"seed must be an integer, got "):
            PaLM(cfg, seed=seed)
    PaLM(cfg, seed=np.uint64(2**64 - 1))       # the largest seed, as a NumPy integer, is fine


def test_core_validates_config_itself():
    """The C++ runtime checks its configuration too (for callers that bypass PaLMConfig)."""
    good = PaLMConfig(**BASE).to_dict()
    cases = [
        ({"n_kv_heads": 3}, r"n_heads \(4\) must be a multiple of n_kv_heads \(3\)"),
        ({"head_dim": 3}, r"head_dim must be even for RoPE, got 3"),
        ({"d_model": 0}, r"d_model must be positive, got 0"),
        ({"n_layers": -1}, r"n_layers must be positive, got -1"),
        ({"max_seq_len": 0}, r"max_seq_len must be positive, got 0"),
        ({"norm_eps": 0.0}, r"norm_eps must be positive and finite"),
        ({"rope_base": float("nan")}, r"rope_base must be positive and finite"),
        ({"z_loss": -1.0}, r"z_loss must be non-negative and finite"),
        ({"vocab_size": 2**31}, r"vocab_size must be below 2\^31, got 2147483648"),
        ({"norm_eps": 1e-50}, r"norm_eps must be positive and finite, in \[1e-30, 1e3\]"),
        ({"z_loss": 1e39}, r"z_loss must be non-negative and finite, at most 1e3"),
        # sizes whose products overflow 64-bit byte counts must be refused, not wrapped
        ({"vocab_size": 2**31 - 1, "d_model": 2**31 - 1, "n_heads": 1, "head_dim": 2, "ffn_dim": 2},
         r"parameters, more than this runtime can hold"),
    ]
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            _core.Model({**good, **change}, 0)


# --------------------------------------------------------------------------- threads

@pytest.mark.parametrize("n,error", [(0, ValueError), (-1, ValueError), (1025, ValueError), (1.5, TypeError),
                                     (True, TypeError), ("2", TypeError), (None, TypeError)])
def test_bad_thread_count(n, error):
    """One error type per kind of mistake: TypeError for a non-integer, ValueError for a
    count out of range."""
    before = palmcore.get_num_threads()
    match = r"the thread count must be in \[1, 1024\], got " if error is ValueError else \
        r"the thread count must be an integer, got "
    with pytest.raises(error, match=match):
        palmcore.set_num_threads(n)
    assert palmcore.get_num_threads() == before


def test_core_rejects_zero_threads():
    before = palmcore.get_num_threads()
    for n in (0, 100_000):
        with pytest.raises(ValueError, match=r"the thread count must be in \[1, 1024\], got "):
            _core.set_num_threads(n)
    assert palmcore.get_num_threads() == before


def test_thread_count_holds_in_every_python_thread():
    """OpenMP's own setting is per thread; palmcore's count must reach calls made from others."""
    import threading

    before = palmcore.get_num_threads()
    seen = []
    try:
        palmcore.set_num_threads(1)
        worker = threading.Thread(target=lambda: seen.append(palmcore.get_num_threads()))
        worker.start()
        worker.join()
    finally:
        palmcore.set_num_threads(before)
    assert seen == [1]


@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5", "99999999999999999999999", "2", "1"])
def test_thread_count_from_environment(value):
    """A good PALMCORE_NUM_THREADS sets the count; a bad one is named in a warning and ignored:
    `import palmcore` (and so the command line) still works, with the default count."""
    env = {k: v for k, v in os.environ.items() if k not in ("PALMCORE_NUM_THREADS", "OMP_NUM_THREADS")}
    code = "import palmcore; print(palmcore.get_num_threads())"
    default = subprocess.run([sys.executable, "-c", code], env=env, cwd="/", capture_output=True, text=True,
                             timeout=60).stdout.strip()
    proc = subprocess.run([sys.executable, "-c", code], env={**env, "PALMCORE_NUM_THREADS": value},
                          cwd="/", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    if value in ("1", "2"):
        assert proc.stdout.strip() == value and not proc.stderr
    else:
        assert proc.stdout.strip() == default
        assert re.search(rf"RuntimeWarning: PALMCORE_NUM_THREADS='{value}' is not a thread count in "
                         r"\[1, 1024\]; ignored", proc.stderr), proc.stderr
    cli = subprocess.run([sys.executable, "-m", "palmcore", "info"], env={**env, "PALMCORE_NUM_THREADS": value},
                         cwd="/", capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and "Traceback" not in cli.stderr, cli.stderr
