"""Compact decode weights (PaLM.set_weights / palmcore.load(..., weights=...)): bf16 and int8
copies of the GEMM weights and the embedding, read by the few-rows decode kernel.

The runtime promises the exact product with the compact values w' (reference.compact_weights):
a model set to "bf16" or "int8" gives the bits of an fp32 model loaded with w', in prefill (> 64
rows, float32 GEMMs over w') and in decode steps (<= 64 rows, the compact copy widened as it is
read), for every thread count. How close w' is to w is checked against float64."""

from __future__ import annotations

import numpy as np
import pytest

import palmcore
from palmcore import reference
from palmcore.config import PaLMConfig

from helpers import random_params

FORMATS = ("bf16", "int8")


def config(**fields) -> PaLMConfig:
    # d_model 72 and ffn 200: reduction lengths with a partial block of 32 (72 = 2·32 + 8,
    # 200 = 6·32 + 8) and output widths that are not multiples of the kernel's 16 or 64
    base = dict(vocab_size=389, d_model=72, n_layers=2, n_heads=4, n_kv_heads=1, ffn_dim=200, max_seq_len=160)
    return PaLMConfig(**{**base, **fields})


def models(cfg, weights, seed=0):
    """(a model computing with compact `weights`, an fp32 model holding their values w')."""
    params = {n: w.astype(np.float32) for n, w in random_params(cfg, seed).items()}
    compact = palmcore.PaLM(cfg)
    compact.load_state_dict(params)
    compact.set_weights(weights)
    plain = palmcore.PaLM(cfg)
    plain.load_state_dict(reference.compact_weights(params, weights))
    return compact, plain


@pytest.mark.parametrize("weights", FORMATS)
@pytest.mark.parametrize("fields", [{}, {"n_kv_heads": 2, "d_model": 96, "ffn_dim": 256}])
def test_decode_and_prefill_give_the_bits_of_the_float32_model_over_the_compact_values(weights, fields):
    cfg = config(**fields)
    compact, plain = models(cfg, weights)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (70, 1, 9, 33)]  # 113 rows: prefill
    caches = compact.kv_cache(slots=4), plain.kv_cache(slots=4)
    rows = np.concatenate(prompts)
    slots = np.repeat(np.arange(4), [len(p) for p in prompts])
    got, want = (c.feed(rows, slots) for c in caches)
    np.testing.assert_array_equal(got, want)
    for step in range(3):  # decode steps: 4 rows, then 1 row
        ids = rng.integers(0, cfg.vocab_size, 4)
        got, want = (c.feed(ids, np.arange(4)) for c in caches)
        np.testing.assert_array_equal(got, want)
        got, want = (c.feed(ids[:1], 2) for c in caches)
        np.testing.assert_array_equal(got, want)
    assert compact.generate(prompts, max_new_tokens=12, temperature=0.0) == \
        plain.generate(prompts, max_new_tokens=12, temperature=0.0)


@pytest.mark.parametrize("weights", FORMATS)
def test_the_compact_product_does_not_depend_on_the_thread_count(weights):
    cfg = config(d_model=128, ffn_dim=512, vocab_size=1031)
    compact, _ = models(cfg, weights)
    before = palmcore.get_num_threads()
    try:
        out = []
        for threads in (1, 2, 3):
            palmcore.set_num_threads(threads)
            out.append(compact.kv_cache(slots=1).feed([5, 17, 300]))
    finally:
        palmcore.set_num_threads(before)
    for o in out[1:]:
        np.testing.assert_array_equal(o, out[0])


def test_the_int8_values_are_within_half_a_step_of_the_weights():
    """|w' - w| <= s/2 per block of 32 along the reduction axis (s = max|w| / 127), up to the
    float32 rounding of q · s; an all-zero block stays zero; +-max|w| is exact up to that rounding."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((70, 45)) * np.exp(rng.standard_normal((70, 45)))  # mixed magnitudes
    w[32:64, 3] = 0.0
    for transposed in (False, True):
        x = (w.T if transposed else w).astype(np.float32)
        got = reference.quantize_q8(x, transposed).astype(np.float64)
        rows = x.T if transposed else x
        err = np.abs((got.T if transposed else got) - rows)
        for first in range(0, rows.shape[0], 32):
            block = rows[first:first + 32].astype(np.float64)
            step = np.abs(block).max(axis=0) / 127
            assert np.all(err[first:first + 32] <= step / 2 * (1 + 1e-6) + 1e-30)
        assert np.all((got.T if transposed else got)[32:64, 3] == 0)


def test_the_bf16_values_are_the_weights_rounded_and_the_rest_stays():
    """(That the runtime computes with exactly these values is what the bit-equality tests show.)"""
    cfg = config()
    params = {n: w.astype(np.float32) for n, w in random_params(cfg, 3).items()}
    bf16 = reference.compact_weights(params, "bf16")
    for name in ("embed", "layers.0.attn.wq", "layers.1.mlp.w_down"):
        rel = np.abs(bf16[name] - params[name]) / np.maximum(np.abs(params[name]), 1e-30)
        assert 0 < rel.max() <= 2.0 ** -8
    assert np.array_equal(reference.compact_weights(params, "fp32")["embed"], params["embed"])
    assert np.array_equal(bf16["layers.0.norm.scale"], params["layers.0.norm.scale"])


@pytest.mark.parametrize("weights", FORMATS)
def test_changed_parameters_are_compacted_again(weights):
    cfg = config()
    compact, plain = models(cfg, weights, seed=0)
    new = {n: w.astype(np.float32) for n, w in random_params(cfg, 7).items()}
    compact.load_state_dict({"layers.1.mlp.w_up": new["layers.1.mlp.w_up"], **{
        n: w for n, w in compact.state_dict().items() if n != "layers.1.mlp.w_up"}})
    expected = plain.state_dict()
    expected["layers.1.mlp.w_up"] = reference.compact_weights(new, weights)["layers.1.mlp.w_up"]
    plain.load_state_dict(expected)
    np.testing.assert_array_equal(compact.kv_cache().feed([1, 2, 3]), plain.kv_cache().feed([1, 2, 3]))
    # the master copy is untouched: state_dict gives the float32 weights, not w'
    assert np.array_equal(compact.state_dict()["layers.1.mlp.w_up"], new["layers.1.mlp.w_up"])
    # an optimizer step changes every weight; the compact copy follows
    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 17))
    opt = palmcore.AdamW(compact)
    compact.forward_backward(tokens[:, :-1], tokens[:, 1:])
    opt.step(lr=1e-2)
    plain.load_state_dict(reference.compact_weights(compact.state_dict(), weights))
    np.testing.assert_array_equal(compact.kv_cache().feed([4, 5]), plain.kv_cache().feed([4, 5]))


def test_back_to_fp32_is_the_float32_model():
    cfg = config()
    params = {n: w.astype(np.float32) for n, w in random_params(cfg, 5).items()}
    model = palmcore.PaLM(cfg)
    model.load_state_dict(params)
    want = model.kv_cache().feed([3, 1, 4])
    model.set_weights("int8")
    assert model.weights == "int8"
    assert not np.array_equal(model.kv_cache().feed([3, 1, 4]), want)
    model.set_weights("fp32")
    np.testing.assert_array_equal(model.kv_cache().feed([3, 1, 4]), want)


def test_a_mixture_of_experts_keeps_its_experts_in_float32():
    cfg = config(n_experts=4, expert_top_k=2, expert_ffn_dim=48, moe_every=2)
    compact, plain = models(cfg, "int8")
    np.testing.assert_array_equal(compact.kv_cache().feed([7, 8, 9]), plain.kv_cache().feed([7, 8, 9]))


def test_bad_weight_formats_are_refused_by_name():
    cfg = config()
    model = palmcore.PaLM(cfg)
    with pytest.raises(ValueError, match="weights must be 'fp32', 'bf16' or 'int8', got 'q4'"):
        model.set_weights("q4")
    with pytest.raises(TypeError, match="weights must be"):
        model.set_weights(8)
    with pytest.raises(ValueError, match="precision to fp32 first"):
        palmcore.PaLM(cfg, precision="bf16", weights="int8")
    model.set_weights("bf16")
    with pytest.raises(ValueError, match="weight format .* back to fp32 first"):
        model.core.set_precision("bf16")
    params = {n: w.astype(np.float32) for n, w in random_params(cfg, 0).items()}
    params["layers.0.attn.wq"][0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        model.load_state_dict(params)


def test_load_and_generate_take_the_weights(tmp_path):
    result = palmcore.train(texts=["def f(x):\n    return x + 1\n" * 40, "import os\nprint(os.sep)\n" * 40],
                            out=str(tmp_path / "run"), steps=3, d_model=64, n_layers=1, progress=False,
                            sample_tokens=0)
    model, _ = palmcore.load(result.run, weights="int8")
    assert model.weights == "int8"
    fp32 = palmcore.generate(result.run, "def f(", max_new_tokens=8, temperature=0.0)
    int8 = palmcore.generate(result.run, "def f(", max_new_tokens=8, temperature=0.0, weights="int8")
    assert isinstance(fp32, str) and isinstance(int8, str)
