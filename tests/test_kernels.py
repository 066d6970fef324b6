"""Each CPU kernel on its own against palmcore.reference (float64), on random inputs of several
shapes, odd sizes included, with 1 and 2 threads.

Error measure: helpers.scaled_err(a, b, floor) = max|a - b| / max(max|b|, floor). The kernels
compute in float32 from float32 inputs; the reference gets the same float32 values in float64.
Each floor is the size of the terms the output is computed from (stated at each check), so an
output that cancels to ~0 (the query and key gradients of attention over one key, layer norm's
dx over two columns, a silu' zero, ce = lse - z_y of a confident row) is compared against the
scale of its rounding, not divided by itself. Tolerance: 1e-5 (TIGHT) for the element-wise and
row-wise kernels, 1e-4 (LOOSE) for the ones that sum long products (attention, cross-entropy
over a vocabulary).
"""

from __future__ import annotations

import numpy as np
import pytest

from palmcore import _core
from palmcore import reference as ref

from helpers import max_abs, scaled_err

K = _core.kernels
TIGHT, LOOSE = 1e-5, 1e-4

pytestmark = pytest.mark.usefixtures("threads")   # every test with 1 and 2 threads (conftest.py)


def f32(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (7, 5, 3), (130, 33, 17), (600, 70, 9), (5, 1100, 12),
                                   # few rows (decode): 64- and 16-column blocks, tails, k pieces
                                   (16, 200, 300), (3, 77, 1000), (64, 130, 97), (65, 700, 40)])
@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_matmul(m, n, k, ta, tb):
    rng = np.random.default_rng(m * n + k)
    a = f32(rng, *((k, m) if ta else (m, k)))
    b = f32(rng, *((n, k) if tb else (k, n)))
    c = f32(rng, m, n)
    want = 0.5 * ((a.T if ta else a).astype(np.float64) @ (b.T if tb else b)) + 2.0 * c
    got = K.matmul(a, ta, b, tb, c.copy(), 0.5, 2.0)
    # floor: the summands' size, 0.5 |A|·|B| + 2 |C| (the classic bound of a product's rounding)
    summands = 0.5 * (np.abs(a.T if ta else a).astype(np.float64) @ np.abs(b.T if tb else b)) + 2.0 * np.abs(c)
    assert scaled_err(got, want, floor=summands.max()) <= TIGHT


@pytest.mark.parametrize("tb", [False, True])
def test_matmul_few_rows_do_not_depend_on_the_others(tb):
    """A decode step's product (<= 64 rows): each row comes out the same bits whether computed
    alone or with others, and beta = 0 never reads C (NaN there stays out)."""
    rng = np.random.default_rng(5)
    a, b = f32(rng, 13, 300), f32(rng, *((517, 300) if tb else (300, 517)))
    together = K.matmul(a, False, b, tb, np.full((13, 517), np.nan, np.float32), 1.0, 0.0)
    assert np.isfinite(together).all()
    for i in (0, 5, 12):
        alone = K.matmul(a[i:i + 1].copy(), False, b, tb, np.zeros((1, 517), np.float32), 1.0, 0.0)
        assert np.array_equal(alone[0], together[i])


@pytest.mark.parametrize("rows,vocab,width", [(1, 1, 3), (9, 5, 7), (257, 31, 130)])
def test_embedding(rows, vocab, width):
    rng = np.random.default_rng(rows)
    table = f32(rng, vocab, width)
    tokens = rng.integers(0, vocab, rows).astype(np.int32)
    assert np.array_equal(K.embedding_forward(table, tokens), table[tokens])
    dout = f32(rng, rows, width)
    want = np.zeros((vocab, width))
    np.add.at(want, tokens, dout.astype(np.float64))
    # floor: the rows of dout summed into the table's gradient
    assert scaled_err(K.embedding_backward(dout, tokens, vocab), want, floor=max_abs(dout)) <= TIGHT
    # a vocabulary shard holding rows [first, first + held): other ids look up zeros, add nothing
    first, held = vocab // 3, max(1, vocab // 2)
    mine = (tokens >= first) & (tokens < first + held)
    got = K.embedding_forward(table[first:first + held].copy(), tokens, first)
    assert np.array_equal(got[mine], table[tokens[mine]]) and np.all(got[~mine] == 0)
    assert scaled_err(K.embedding_backward(dout, tokens, held, first), want[first:first + held],
                      floor=max_abs(dout)) <= TIGHT


@pytest.mark.parametrize("rows,width,eps", [(1, 2, 1e-5), (13, 7, 1e-5), (300, 257, 1e-3)])
def test_layernorm(rows, width, eps):
    rng = np.random.default_rng(width)
    x = f32(rng, rows, width, scale=3.0) + 1.5
    scale = 1.0 + f32(rng, width, scale=0.3)
    out, xhat, rstd = K.layernorm_forward(x, scale, eps)
    want, cache = ref.layernorm_forward(x.astype(np.float64), scale.astype(np.float64), eps)
    # floors: xhat has unit RMS per row, out = xhat · scale, rstd = (var + eps)^-1/2 > 0 per row
    assert scaled_err(out, want, floor=max_abs(scale)) <= TIGHT
    assert scaled_err(xhat, cache[0], floor=1.0) <= TIGHT
    assert scaled_err(rstd, cache[1][:, 0], floor=cache[1].min()) <= TIGHT
    dout = f32(rng, rows, width)
    dx, dscale = K.layernorm_backward(dout, xhat, rstd, scale)
    want_dx, want_dscale = ref.layernorm_backward(dout.astype(np.float64), cache)
    # dx = rstd (g·dout - mean(g·dout) - xhat mean(g·dout·xhat)): floor rstd·|g·dout|, its terms.
    # With two columns LN's output is ±1 whatever x, so dx is exactly 0 and the kernel's is
    # rounding noise: compared against that floor it is checked too.
    assert scaled_err(dx, want_dx, floor=cache[1].max() * max_abs(scale * dout)) <= TIGHT
    assert scaled_err(dscale, want_dscale, floor=max_abs(dout * xhat)) <= TIGHT


@pytest.mark.parametrize("B,T,heads,dh,base", [(1, 1, 1, 2, 10000.0), (2, 9, 3, 6, 10000.0),
                                               (3, 70, 2, 32, 500.0)])
def test_rope(B, T, heads, dh, base):
    rng = np.random.default_rng(T)
    x = f32(rng, B * T, heads * dh)
    positions = np.tile(np.arange(T, dtype=np.int32), B)
    theta = ref.rope_angles(T, dh, base)
    x4 = x.astype(np.float64).reshape(B, T, heads, dh)
    got = K.rope_apply(x.copy(), positions, heads, base, False)
    # floor: a rotation of x, so the size of x
    assert scaled_err(got, ref.rope_forward(x4, theta).reshape(B * T, -1), floor=max_abs(x)) <= TIGHT
    back = K.rope_apply(x.copy(), positions, heads, base, True)
    assert scaled_err(back, ref.rope_backward(x4, theta).reshape(B * T, -1), floor=max_abs(x)) <= TIGHT


@pytest.mark.parametrize("B,T,H,Hkv,dh", [(1, 1, 1, 1, 2), (2, 7, 4, 1, 6), (1, 65, 6, 2, 8),
                                          (2, 130, 3, 3, 16), (1, 200, 2, 1, 64)])
def test_attention(B, T, H, Hkv, dh):
    """Across the 64-query block edges (T = 65, 130, 200), for MQA, GQA and MHA."""
    rng = np.random.default_rng(T * H)
    q, k, v = f32(rng, B * T, H * dh), f32(rng, B * T, Hkv * dh), f32(rng, B * T, Hkv * dh)
    out, lse = K.attention_forward(q, k, v, B, H, Hkv)
    as4 = lambda a, heads: a.astype(np.float64).reshape(B, T, heads, dh)  # noqa: E731
    want, cache = ref.attention_forward(as4(q, H), as4(k, Hkv), as4(v, Hkv))
    # floors: out is a convex combination of the rows of v; lse is made of the scores (one
    # score, possibly near 0, for T = 1), so their largest magnitude
    assert scaled_err(out, want.reshape(B * T, -1), floor=max_abs(v)) <= LOOSE
    s = np.einsum("bikgd,btkd->bkgit", cache[0], as4(k, Hkv)) / np.sqrt(dh)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    want_lse = ref.logsumexp(s).reshape(B, H, T)          # [b, kv·g = head, i]
    assert scaled_err(lse, want_lse.reshape(-1), floor=max_abs(s[np.isfinite(s)])) <= LOOSE
    dout = f32(rng, B * T, H * dh)
    dq, dk, dv = K.attention_backward(q, k, v, out, lse, dout, B, H, Hkv)
    wq, wk, wv = ref.attention_backward(as4(dout, H), cache)
    # floor: the largest of the three gradients. With T = 1 each query sees one key, its
    # softmax is constant, and dq = dk = 0 exactly in the reference; only dv is not.
    floor = max_abs(wq, wk, wv)
    assert scaled_err(dq, wq.reshape(B * T, -1), floor=floor) <= LOOSE
    assert scaled_err(dk, wk.reshape(B * T, -1), floor=floor) <= LOOSE
    assert scaled_err(dv, wv.reshape(B * T, -1), floor=floor) <= LOOSE


@pytest.mark.parametrize("slots,capacity,H,Hkv,dh", [(3, 70, 4, 1, 6), (2, 9, 6, 2, 4), (2, 5, 3, 3, 2),
                                                      (1, 130, 2, 1, 8)])
def test_attention_cached(slots, capacity, H, Hkv, dh):
    """Ragged rows over a cache: a prefill run longer than one 64-query block where the
    capacity allows, single decode rows of other slots, and runs that restart mid-call. Cache
    entries past a row's position are random too: reading them would show."""
    rng = np.random.default_rng(capacity * H + slots)
    k_cache = f32(rng, slots * capacity, Hkv * dh)
    v_cache = f32(rng, slots * capacity, Hkv * dh)
    run = min(capacity, 67)
    rows = [(0, p) for p in range(run)]                                   # slot 0 prefilled
    rows += [(int(rng.integers(slots)), int(rng.integers(capacity))) for _ in range(7)]  # decode rows
    rows += [(slots - 1, p) for p in range(capacity // 2, capacity)]      # a run from mid-sequence
    slot = np.array([r[0] for r in rows], dtype=np.int32)
    pos = np.array([r[1] for r in rows], dtype=np.int32)
    q = f32(rng, len(rows), H * dh)
    out = K.attention_cached(q, slot, pos, k_cache, v_cache, slots, H, Hkv)
    as4 = lambda a: a.astype(np.float64).reshape(slots, capacity, Hkv, dh)  # noqa: E731
    want = ref.attention_cached(q.astype(np.float64).reshape(-1, H, dh), slot, pos, as4(k_cache), as4(v_cache))
    # floor: each output row is a convex combination of cached values
    assert scaled_err(out, want.reshape(len(rows), -1), floor=max_abs(v_cache)) <= LOOSE


@pytest.mark.parametrize("n", [1, 17, 1000, 4099])
def test_swiglu(n):
    rng = np.random.default_rng(n)
    gate, up, dout = f32(rng, 1, n, scale=4.0), f32(rng, 1, n), f32(rng, 1, n)
    g, u, d = (a.astype(np.float64) for a in (gate, up, dout))
    # floors: |silu(g)| <= |g| and 0 <= sigmoid <= 1, |silu'| <= 1.1; silu' crosses 0 at
    # g = -1.28, so dgate can be ~0 for n = 1, against its terms |dout · up|
    assert scaled_err(K.swiglu_forward(gate, up), ref.silu(g) * u, floor=max_abs(g * u)) <= TIGHT
    dgate, dup = K.swiglu_backward(gate, up, dout)
    assert scaled_err(dgate, d * u * ref.silu_grad(g), floor=max_abs(d * u)) <= TIGHT
    assert scaled_err(dup, d * ref.silu(g), floor=max_abs(d * g)) <= TIGHT


def test_swiglu_extremes():
    """Far in the tails: silu(-100) = -0 (exp of +100 overflows to inf, not NaN), silu(100) = 100."""
    gate = np.array([[-100.0, -30.0, 0.0, 30.0, 100.0]], dtype=np.float32)
    up = np.ones_like(gate)
    got = K.swiglu_forward(gate, up)
    assert np.all(np.isfinite(got))
    assert scaled_err(got, ref.silu(gate.astype(np.float64)), floor=max_abs(gate)) <= TIGHT


def cross_entropy(z, y, z_loss, grad_scale, shards=1):
    """The model's use of the two cross-entropy kernels: the vocabulary cut into ``shards``
    column blocks (as model ranks hold it), per-block statistics combined as the model's
    all-reduces do, then each block's gradient. Returns (dz, row_ce, row_lse)."""
    blocks = np.split(np.arange(z.shape[1]), shards)
    stats = [K.cross_entropy_stats(np.ascontiguousarray(z[:, b]), y, int(b[0])) for b in blocks]
    top = np.max([s[0] for s in stats], axis=0)
    lse = (top + np.log(np.sum([np.exp(s[0] - top) for s in stats], axis=0))).astype(np.float32)
    picked = np.sum([s[1] for s in stats], axis=0)
    dz = np.concatenate([K.cross_entropy_backward(np.ascontiguousarray(z[:, b]), y, int(b[0]), lse, z_loss,
                                                  grad_scale) for b in blocks], axis=1)
    return dz, np.where(y >= 0, lse - picked, 0.0), lse


@pytest.mark.parametrize("rows,vocab,z_loss,shards", [(1, 1, 1e-4, 1), (9, 13, 1e-2, 1), (70, 1001, 1e-4, 1),
                                                      (9, 14, 1e-2, 2), (33, 1002, 1e-4, 3)])
def test_cross_entropy(rows, vocab, z_loss, shards):
    """Whole and vocabulary-sharded (2 and 3 column blocks) against the reference."""
    rng = np.random.default_rng(vocab)
    z = f32(rng, rows, vocab, scale=3.0)
    y = rng.integers(0, vocab, rows).astype(np.int32)
    y[0] = -1  # ignored
    n = int((y >= 0).sum())
    dz, row_ce, row_lse = cross_entropy(z, y, z_loss, 1.0 / max(n, 1), shards)
    z64 = z.astype(np.float64)[None]
    _, _, _, cache = ref.cross_entropy_forward(z64, y[None], z_loss)
    lse = ref.logsumexp(z64)[0]
    counted = y >= 0
    # floors: lse and ce = lse - z_y (~0 for a confident row) are made of logits, scale max|z|
    # plus log V; dz = grad_scale (softmax - onehot + 2 z_loss lse softmax), scale grad_scale
    floor = max_abs(z) + np.log(vocab)
    assert scaled_err(row_lse, lse, floor=floor) <= TIGHT
    want_ce = lse - z64[0, np.arange(rows), np.maximum(y, 0)]
    assert scaled_err(row_ce[counted], want_ce[counted], floor=floor) <= LOOSE
    assert np.all(dz[~counted] == 0)
    if n:
        assert scaled_err(dz, ref.cross_entropy_backward(cache)[0], floor=1.0 / n) <= LOOSE


def test_cross_entropy_masked_and_nan_logits():
    """A -inf logit (a masked token) gets probability 0; a NaN logit gives NaN, never a number."""
    z = np.array([[0.0, -np.inf, 1.0], [0.5, np.nan, 0.0]], dtype=np.float32)
    y = np.array([0, 2], dtype=np.int32)
    dz, row_ce, _ = cross_entropy(z, y, 0.0, 1.0)
    want_lse = np.log(np.exp(0.0) + np.exp(1.0))
    assert scaled_err(row_ce[0], want_lse, floor=1.0) <= TIGHT and dz[0, 1] == 0.0
    assert np.isnan(row_ce[1])
