"""The bf16 mode (PALM_SPEC "Precision") on the CPU: the oracle a GPU's bf16 mode must match.

The runtime rounds at the points listed above Model::run_forward (csrc/model.cpp); the float64
reference (precision="bf16") rounds at the same points. Where the inputs of a rounding point
agree, both round alike; float32 arithmetic before a rounding point (the runtime) differs from
float64 (the reference) by ~1e-7, which moves an occasional value across a bf16 rounding
boundary: one element then differs by one bf16 ulp (2^-8 relative), and in a deep model that
spreads through the backward pass. The checks compare distances (Frobenius norm, relative): the runtime's bf16 results must be
much closer to the bf16 reference ("near") than to the float32 one ("far"): a missing or extra
rounding point moves them by about as much as far.
- logits: near <= far / 20 (seen: near 3e-8 to 8e-5, far 2e-3 to 7e-3);
- gradients: near <= far / 2 for every tensor, and the median over tensors of near / far
  <= 0.1 (seen: at most 0.28 for one tensor, medians below 0.03);
- bf16 differs from fp32 clearly (> 1e-4) but little (< 5e-2), and a short training run's
  loss follows fp32's within 2%.
"""

from __future__ import annotations

import numpy as np
import pytest

import palmcore
from palmcore import reference as ref

from helpers import random_params, random_tokens

ONE_LAYER = {
    "mqa": palmcore.PaLMConfig(vocab_size=37, d_model=12, n_layers=1, n_heads=4, n_kv_heads=1, head_dim=4,
                               ffn_dim=20, max_seq_len=80, z_loss=1e-2),
    "gqa": palmcore.PaLMConfig(vocab_size=29, d_model=10, n_layers=1, n_heads=6, n_kv_heads=2, head_dim=6,
                               ffn_dim=14, max_seq_len=80, z_loss=1e-2, rope_base=100.0),
    "mha": palmcore.PaLMConfig(vocab_size=23, d_model=12, n_layers=1, n_heads=3, n_kv_heads=3, ffn_dim=18,
                               max_seq_len=80, z_loss=1e-2, norm_eps=1e-3),
}
DEEP = palmcore.PaLMConfig(vocab_size=53, d_model=24, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8,
                           ffn_dim=40, max_seq_len=80, z_loss=1e-2)


def models(cfg, seed):
    """The same random (float32) weights in an fp32 and a bf16 model, and as float64."""
    params = {n: w.astype(np.float32) for n, w in random_params(cfg, seed).items()}
    out = []
    for precision in ("fp32", "bf16"):
        m = palmcore.PaLM(cfg, precision=precision)
        m.load_state_dict(params)
        out.append(m)
    return out[0], out[1], {n: w.astype(np.float64) for n, w in params.items()}


def fro(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check_near(got_logits, got_grads, p64, cfg, tokens):
    """The logits and gradients of the runtime's bf16 mode against both references."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    near = fro(got_logits, ref.forward(p64, cfg, inputs, precision="bf16"))
    far = fro(got_logits, ref.forward(p64, cfg, inputs))
    assert near <= far / 20, (near, far)
    want16 = ref.loss_and_grads(p64, cfg, inputs, targets, precision="bf16")["grads"]
    want32 = ref.loss_and_grads(p64, cfg, inputs, targets)["grads"]
    ratios = []
    for n, g in got_grads.items():
        if not np.any(want32[n]):   # T = 1: no gradient reaches wq and wk
            assert np.abs(g).max() <= 1e-6 * max(np.abs(w).max() for w in want32.values()), n
            continue
        near, far = fro(g, want16[n]), fro(g, want32[n])
        assert near <= far / 2 and far > 1e-5, (n, near, far)
        ratios.append(near / far)
    assert np.median(ratios) <= 0.1, ratios


def run(model, tokens):
    model.zero_grad()
    out = model.forward_backward(tokens[:, :-1], tokens[:, 1:])
    return model.forward(tokens[:, :-1]), out, model.grads()


@pytest.mark.parametrize("name", list(ONE_LAYER))
@pytest.mark.parametrize("B,T", [(1, 1), (2, 7), (3, 70)])
def test_one_layer_rounds_where_the_reference_does(threads, name, B, T):
    cfg = ONE_LAYER[name]
    _, bf16, p64 = models(cfg, seed=B * 100 + T)
    tokens = random_tokens(cfg, B, T + 1, seed=T)
    logits, out, grads = run(bf16, tokens)
    want = ref.loss_and_grads(p64, cfg, tokens[:, :-1], tokens[:, 1:], precision="bf16")
    assert abs(out["loss"] - want["loss"]) <= 1e-5 * abs(want["loss"])
    check_near(logits, grads, p64, cfg, tokens)


@pytest.mark.parametrize("B,T", [(2, 7), (3, 40)])
def test_a_deep_model_is_closer_to_the_bf16_reference_than_to_fp32(threads, B, T):
    _, bf16, p64 = models(DEEP, seed=7 + T)
    tokens = random_tokens(DEEP, B, T + 1, seed=1)
    logits, _, grads = run(bf16, tokens)
    check_near(logits, grads, p64, DEEP, tokens)


def test_bf16_differs_from_fp32_clearly_but_little():
    fp32, bf16, _ = models(DEEP, seed=3)
    tokens = random_tokens(DEEP, 2, 33, seed=2)
    (l32, o32, g32), (l16, o16, g16) = run(fp32, tokens), run(bf16, tokens)
    diff = np.abs(l16 - l32).max() / np.abs(l32).max()
    assert 1e-4 < diff < 5e-2, diff
    assert 0 < abs(o16["loss"] - o32["loss"]) < 1e-2 * o32["loss"]
    for n in g32:
        assert 1e-5 < fro(g16[n], g32[n]) < 5e-2, n


def test_weights_stay_float32_and_the_copy_follows_updates():
    """state_dict is the float32 master; the GEMMs read its bf16 rounding, refreshed by every
    optimizer step and every load_state_dict."""
    fp32, bf16, p64 = models(DEEP, seed=5)
    assert bf16.precision == "bf16" and fp32.precision == "fp32"
    sd = bf16.state_dict()
    assert all(w.dtype == np.float32 for w in sd.values())
    assert any(not np.array_equal(w, ref.round_bf16(w).astype(np.float32)) for w in sd.values())
    tokens = random_tokens(DEEP, 2, 17, seed=4)
    opt = palmcore.Adafactor(bf16)
    run(bf16, tokens)
    opt.step(1e-2)
    for weights in ({n: w.astype(np.float64) for n, w in bf16.state_dict().items()}, p64):
        bf16.load_state_dict({n: w.astype(np.float32) for n, w in weights.items()})
        got = bf16.forward(tokens[:, :-1])
        near = fro(got, ref.forward(weights, DEEP, tokens[:, :-1], precision="bf16"))
        assert near <= fro(got, ref.forward(weights, DEEP, tokens[:, :-1])) / 20


def test_bf16_generation_uses_the_same_rounding():
    """Cached decoding in the bf16 mode gives the bf16 full forward's logits."""
    fp32, bf16, _ = models(DEEP, seed=9)
    tokens = random_tokens(DEEP, 1, 12, seed=3)
    cache = bf16.kv_cache(1)
    got = np.stack([cache.feed(tokens[0, :5])[0]] + [cache.feed([t])[0] for t in tokens[0, 5:]])
    near, far = fro(got, bf16.forward(tokens)[0, 4:]), fro(got, fp32.forward(tokens)[0, 4:])
    assert near <= far / 20, (near, far)


def test_precision_is_checked():
    with pytest.raises(ValueError, match=r"precision must be 'fp32' or 'bf16', got 'fp16'"):
        palmcore.PaLM(DEEP, precision="fp16")
    with pytest.raises(ValueError, match=r"precision must be 'fp32' or 'bf16'"):
        ref.forward({}, DEEP, np.zeros((1, 1), np.int64), precision="half")


def test_round_bf16_matches_the_runtime():
    """The reference's rounding and the runtime's (bf16.h, shared with CUDA) agree bit for bit,
    ties to even and NaN included."""
    scales = (10.0 ** np.arange(-5, 5)).repeat(1000)
    x = np.concatenate([(np.random.default_rng(0).standard_normal(10000) * scales).astype(np.float32),
                        np.array([1.0 + 2**-8, 1.0 + 3 * 2**-8, -1.0 - 2**-8, 3.4e38, -0.0, 0.0, np.inf, -np.inf,
                                  np.float32(1) + np.float32(2**-9)], np.float32)])
    got = palmcore._core.kernels.round_bf16(x)
    want = ref.round_bf16(x).astype(np.float32)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert ref.round_bf16(np.float32(1.0 + 2**-8)) == 1.0 and ref.round_bf16(np.float32(1.0 + 3 * 2**-8)) == 1.0 + 2**-6
    assert np.isnan(palmcore._core.kernels.round_bf16(np.array([np.nan], np.float32))[0])


def test_a_bf16_training_run_follows_fp32(corpus, tmp_path):
    """`palmcore train --precision bf16`: the same run in bf16 follows the fp32 loss curve
    within 2% at every step, its checkpoints hold float32 weights, and it resumes."""
    import json

    from palmcore import checkpoint
    from palmcore.cli import main

    common = ["train", "--corpus", corpus, "--vocab-size", "300", "--set", "d_model=32", "--set", "n_layers=2",
              "--set", "n_heads=2", "--batch-size", "4", "--seq-len", "16", "--eval-every", "5"]
    curves = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        assert main(common + ["--steps", "10", "--precision", precision, "--out", str(out)]) == 0
        with open(out / "metrics.jsonl") as f:
            curves[precision] = [json.loads(line)["loss"] for line in f]
    assert len(curves["bf16"]) == 10
    for a, b in zip(curves["fp32"], curves["bf16"]):
        assert abs(a - b) <= 0.02 * a, (a, b)
    assert curves["fp32"] != curves["bf16"]
    ck = checkpoint.load(str(tmp_path / "bf16" / "checkpoints"))
    assert all(w.dtype == np.float32 for w in ck.model.state_dict().values())
    assert main(common + ["--steps", "12", "--precision", "bf16", "--out", str(tmp_path / "bf16"), "--resume"]) == 0


def test_switching_precision_after_a_step():
    """set_precision resizes what the step keeps (bf16 keeps a rounded copy of dx): a model
    switched after an fp32 step computes what a bf16 model does."""
    fp32, bf16, _ = models(DEEP, seed=11)
    tokens = random_tokens(DEEP, 2, 17, seed=6)
    run(fp32, tokens)
    fp32.core.set_precision("bf16")
    (l1, o1, g1), (l2, o2, g2) = run(fp32, tokens), run(bf16, tokens)
    assert np.array_equal(l1, l2) and o1 == o2 and all(np.array_equal(g1[n], g2[n]) for n in g1)


@pytest.mark.parametrize("cfg", [DEEP, ONE_LAYER["mha"]], ids=["deep-gqa", "mha"])
def test_bfloat16_storage_gives_the_float32_storage_bits(threads, cfg):
    """The bf16 mode with its activations, weight copy and cache stored as bfloat16 (the CUDA
    kernels' form; on the CPU each op runs on float32 twins and rounds its outputs back) gives
    exactly the bits of the CPU's float32 storage: logits, loss, every gradient, two optimizer
    steps and cached decoding. This is the model's CUDA bf16 path run on the CPU."""
    _, wide, _ = models(cfg, seed=13)
    _, narrow, _ = models(cfg, seed=13)
    narrow.core.set_precision("bf16", storage="bfloat16")
    assert (wide.core.activation_dtype(), narrow.core.activation_dtype()) == ("float32", "bfloat16")
    tokens = random_tokens(cfg, 3, 21, seed=8)
    opts = [palmcore.AdamW(m) for m in (wide, narrow)]
    for _ in range(2):
        (l1, o1, g1), (l2, o2, g2) = run(wide, tokens), run(narrow, tokens)
        assert np.array_equal(l1, l2) and o1 == o2
        assert all(np.array_equal(g1[n], g2[n]) for n in g1)
        for opt in opts:
            opt.step(1e-2)
    caches = [m.kv_cache(2) for m in (wide, narrow)]
    assert caches[1].nbytes * 2 == caches[0].nbytes
    feeds = [(tokens[0, :6], [0] * 6), (np.concatenate([tokens[1, :4], tokens[0, 6:7]]), [1, 1, 1, 1, 0])]
    feeds += [(tokens[:2, t], [0, 1]) for t in range(7, 10)]  # ragged prefill, then decode steps
    for ids, slots in feeds:
        a, b = (c.feed(ids, slots) for c in caches)
        assert np.array_equal(a, b)


def test_a_cache_of_another_precision_is_refused():
    _, bf16, _ = models(DEEP, seed=1)
    cache = bf16.kv_cache(1)
    bf16.core.set_precision("bf16", storage="bfloat16")
    with pytest.raises(ValueError, match="the cache was made for another precision"):
        cache.feed([1, 2], [0, 0])
    with pytest.raises(ValueError, match="storage must be 'float32' or 'bfloat16'"):
        bf16.core.set_precision("bf16", storage="float16")
