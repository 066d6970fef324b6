"""The attention ops on every available backend (the `device` fixture: cpu, and cuda where a GPU
is), through _core.kernels.attention_*_on (array -> device -> op -> array), against the CPU
kernel and against palmcore.reference (float64). MQA, GQA and MHA; T = 1, 5 and 70 (70 crosses
the CPU's 64-query blocks); head_dim 2, 8 and 12; float32 and the bf16 flag (p and ds' rounded
inside); model shards (first_head / group); the cached attention over ragged rows.

Error measure: helpers.scaled_err(a, b, floor) = max|a - b| / max(max|b|, floor), floors:
  out      max|v| (out is a convex combination of the rows of v)
  lse      max|s| over the visible scores (lse lies between max s and max s + log T)
  dq/dk/dv the largest of the three gradients (dq = dk = 0 exactly for T = 1)
Tolerances and why:
  device vs CPU kernel, fp32: 1e-5 for everything (both float32 from the same inputs, sums in
    other orders; the CPU kernel itself is within 4e-7 of float64 on these cases).
  device vs CPU kernel, bf16: 1e-2 for out and gradients. p (and ds') are rounded to bf16 from
    float32 values that differ in the last bits between backends, so an element may land on the
    neighbouring bf16 value: one bf16 ulp is at most 2^-7 of the value, and since Σ_j p_j = 1
    such flips move out by at most 2^-7 · max|v| = 7.8e-3 in all. lse is not rounded: 1e-5.
    A flag ignored altogether would still pass 1e-2, so a bf16 result must also be much closer
    to the CPU's bf16 result than to the CPU's fp32 result (Frobenius norms, ratio <= 1/4).
  vs the reference, fp32: 1e-4 (test_kernels.py's LOOSE).
  vs the reference, bf16: 2e-2. The reference also rounds out, dq, dk and dv (half a bf16 ulp,
    2^-9 of each value) and rounds p from float64, so flips as above come on top (the CPU
    kernel's worst case here: 8e-3, for dq).
The CPU kernel compared with itself through the new binding is bit-identical; a CUDA run twice
must be bit-identical too (no atomics, fixed reduction orders).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

import palmcore
from palmcore import _core
from palmcore import reference as ref

from helpers import max_abs, scaled_err

K = _core.kernels

GROUPINGS = {"MQA": (2, 4, 1), "GQA": (1, 6, 2), "MHA": (2, 3, 3)}  # (B, H, Hkv)
VS_CPU = {"fp32": (1e-5, 1e-5), "bf16": (1e-2, 1e-2)}  # (out, gradients); lse always 1e-5
VS_REF = {"fp32": 1e-4, "bf16": 2e-2}
LSE_TOL = 1e-5
NEAR_FAR = 0.25


def f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def inputs(B, T, H, Hkv, dh, seed):
    rng = np.random.default_rng(seed)
    return (f32(rng, B * T, H * dh), f32(rng, B * T, Hkv * dh), f32(rng, B * T, Hkv * dh), f32(rng, B * T, H * dh))


def forward(device, q, k, v, B, H, Hkv, bf16, first_head=0, group=0):
    return K.attention_forward_on(q, k, v, B, H, Hkv, first_head, group, bf16, device)


def backward(device, q, k, v, out, lse, dout, B, H, Hkv, bf16, first_head=0, group=0):
    return K.attention_backward_on(q, k, v, out, lse, dout, B, H, Hkv, first_head, group, bf16, device)


@contextlib.contextmanager
def kernel_choice(kernels):
    """The CUDA kernels ("fast" or "plain") chosen while inside; restored after."""
    before = palmcore.get_kernels()
    palmcore.set_kernels(kernels)
    try:
        yield
    finally:
        palmcore.set_kernels(before)


def fro(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))


def reference(q, k, v, dout, B, T, H, Hkv, dh, bf16):
    """out, lse, (dq, dk, dv) in float64 as [B·T, ·] / [B·H·T], and the scores' largest magnitude."""
    as4 = lambda a, heads: a.astype(np.float64).reshape(B, T, heads, dh)  # noqa: E731
    rnd = ref.round_bf16 if bf16 else (lambda x: x)
    out, cache = ref.attention_forward(as4(q, H), as4(k, Hkv), as4(v, Hkv), rnd)
    s = np.einsum("bikgd,btkd->bkgit", cache[0], as4(k, Hkv)) / np.sqrt(dh)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    lse = ref.logsumexp(s).reshape(-1)                       # [b, kv·g = head, i]
    grads = ref.attention_backward(as4(dout, H), cache)
    return out.reshape(B * T, -1), lse, [g.reshape(B * T, -1) for g in grads], max_abs(s[np.isfinite(s)])


# The flash kernels' own rounding points (ref.online_softmax): they round exp(s - running max)
# before p·V and normalise after, where the CPU kernel and the plain ones round the normalised p
# (PALM_SPEC "Precision"). Both are bf16 roundings of the same probabilities, within the 2e-2 the
# tests allow, but a near/far check (ratio <= 1/4) can only tell "rounded here" from "not rounded
# at all" against an oracle that rounds where the kernel does.
FLASH_BLOCK = 64  # cuda/flash_attention.cu kBlock: keys per block, one running max per block
DECODE_WARPS = 4  # cuda/decode_attention.cu kWarps: warp w of a split takes its keys j = w (mod 4)


def flash_forward_oracle(q, k, v, B, T, H, Hkv, dh):
    """out of the flash forward on bf16 storage: key blocks of FLASH_BLOCK in order, exp(s - m)
    rounded to bf16 before p·V, out rounded to bf16 once; [B·T, H·dh] float64."""
    G = H // Hkv
    qg = q.astype(np.float64).reshape(B, T, Hkv, G, dh)
    k4, v4 = (a.astype(np.float64).reshape(B, T, Hkv, dh) for a in (k, v))
    s = np.einsum("bikgd,btkd->bkgit", qg, k4) / np.sqrt(dh)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    blocks = [np.arange(j, min(j + FLASH_BLOCK, T)) for j in range(0, T, FLASH_BLOCK)]
    out = ref.online_softmax(s, v4.transpose(0, 2, 1, 3)[:, :, None, None], [blocks], ref.round_bf16)
    return ref.round_bf16(out.transpose(0, 3, 1, 2, 4).reshape(B * T, H * dh))


def decode_oracle(q, slot, pos, k_cache, v_cache, slots, H, Hkv):
    """out of the flash-decoding kernels with the bf16 flag: the cache cut into splits of
    max(32, ceil(capacity / 128)) positions, each split's positions dealt to DECODE_WARPS warps,
    each warp a running max per key; [R, H·dh] float64."""
    capacity, dh, G = k_cache.shape[0] // slots, q.shape[1] // H, H // Hkv
    span = max(32, (capacity + 127) // 128)
    kc, vc = (a.astype(np.float64).reshape(slots, capacity, Hkv, dh) for a in (k_cache, v_cache))
    out = np.empty((len(slot), H * dh))
    for r, (b, p) in enumerate(zip(slot, pos)):
        s = np.einsum("kgd,tkd->kgt", q[r].astype(np.float64).reshape(Hkv, G, dh), kc[b, : p + 1]) / np.sqrt(dh)
        passes = [[np.array([j]) for j in range(start + w, min(start + span, p + 1), DECODE_WARPS)]
                  for start in range(0, p + 1, span) for w in range(DECODE_WARPS)]
        out[r] = ref.online_softmax(s, vc[b, : p + 1].transpose(1, 0, 2)[:, None], [c for c in passes if c],
                                    ref.round_bf16).reshape(-1)
    return out


def test_the_online_softmax_oracle():
    """ref.online_softmax without rounding is softmax @ v for the flash and the decode chunkings;
    with rounding it rounds exp(s - running max) (checked on one chunk by hand), and its flash
    forward stays within the bf16 tolerance (2e-2) of the CPU's bf16 kernel."""
    B, H, Hkv, T, dh = 2, 4, 2, 130, 64
    q, k, v, _ = inputs(B, T, H, Hkv, dh, seed=5)
    as4 = lambda a, heads: a.astype(np.float64).reshape(B, T, heads, dh)  # noqa: E731
    want, _ = ref.attention_forward(as4(q, H), as4(k, Hkv), as4(v, Hkv))
    s = np.einsum("bikgd,btkd->bkgit", as4(q, H).reshape(B, T, Hkv, 2, dh), as4(k, Hkv)) / np.sqrt(dh)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    values = as4(v, Hkv).transpose(0, 2, 1, 3)[:, :, None, None]
    blocks = [[np.arange(j, min(j + 64, T)) for j in range(0, T, 64)]]
    dealt = [[np.array([j]) for j in range(w, T, 4)] for w in range(4)]
    for passes in (blocks, dealt, [[np.arange(T)]]):
        got = ref.online_softmax(s, values, passes).transpose(0, 3, 1, 2, 4).reshape(want.shape)
        assert scaled_err(got, want, floor=max_abs(v)) <= 1e-12
    row, keys = s[0, 0, 0, T - 1], values[0, 0, 0, 0]  # the last query sees every key
    e = np.exp(row - row.max())
    by_hand = (ref.round_bf16(e) @ keys) / e.sum()
    np.testing.assert_allclose(ref.online_softmax(row, keys, [[np.arange(T)]], ref.round_bf16), by_hand, rtol=1e-12)
    cpu_out, _ = forward("cpu", q, k, v, B, H, Hkv, True)
    assert scaled_err(flash_forward_oracle(q, k, v, B, T, H, Hkv, dh), cpu_out, floor=max_abs(v)) <= 2e-2
    slots, capacity = 2, 300
    rng = np.random.default_rng(3)
    k_cache, v_cache = f32(rng, slots * capacity, Hkv * dh), f32(rng, slots * capacity, Hkv * dh)
    slot, pos = np.array([0, 1, 1], np.int32), np.array([31, 64, 299], np.int32)
    qd = f32(rng, 3, H * dh)
    cpu = K.attention_cached_on(qd, slot, pos, k_cache, v_cache, slots, H, Hkv, True, "cpu")
    assert scaled_err(decode_oracle(qd, slot, pos, k_cache, v_cache, slots, H, Hkv), cpu, floor=max_abs(v_cache)) <= 1e-2


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("T", [1, 5, 70])
@pytest.mark.parametrize("dh", [2, 8, 12])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_attention_matches_cpu_and_reference(device, grouping, T, dh, precision):
    B, H, Hkv = GROUPINGS[grouping]
    bf16 = precision == "bf16"
    q, k, v, dout = inputs(B, T, H, Hkv, dh, seed=T * 1000 + dh * 10 + H)
    out, lse = forward(device, q, k, v, B, H, Hkv, bf16)
    cpu_out, cpu_lse = forward("cpu", q, k, v, B, H, Hkv, bf16)
    # the backward pass of both backends from the same (CPU) out and lse: it is checked alone
    dq, dk, dv = backward(device, q, k, v, cpu_out, cpu_lse, dout, B, H, Hkv, bf16)
    cpu_grads = backward("cpu", q, k, v, cpu_out, cpu_lse, dout, B, H, Hkv, bf16)
    want_out, want_lse, want_grads, s_max = reference(q, k, v, dout, B, T, H, Hkv, dh, bf16)
    floor_v, floor_g = max_abs(v), max_abs(*want_grads)

    out_tol, grad_tol = VS_CPU[precision]
    assert scaled_err(out, cpu_out, floor=floor_v) <= out_tol
    assert scaled_err(lse, cpu_lse, floor=s_max) <= LSE_TOL
    for got, cpu in zip((dq, dk, dv), cpu_grads):
        assert scaled_err(got, cpu, floor=floor_g) <= grad_tol

    tol = VS_REF[precision]
    assert scaled_err(out, want_out, floor=floor_v) <= tol
    assert scaled_err(lse, want_lse, floor=s_max) <= VS_REF["fp32"]  # lse is never rounded
    for got, want in zip((dq, dk, dv), want_grads):
        assert scaled_err(got, want, floor=floor_g) <= tol

    if bf16 and T > 1:  # the rounding happened, and at the CPU's points
        fp32_out, _ = forward("cpu", q, k, v, B, H, Hkv, False)
        fp32_grads = backward("cpu", q, k, v, cpu_out, cpu_lse, dout, B, H, Hkv, False)
        assert fro(out, cpu_out) <= NEAR_FAR * fro(fp32_out, cpu_out)
        for got, cpu, fp32 in zip((dq, dk, dv), cpu_grads, fp32_grads):
            assert fro(got, cpu) <= NEAR_FAR * fro(fp32, cpu)


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_cpu_binding_is_the_cpu_kernel(grouping):
    """The new binding on "cpu" gives the very bits of the existing CPU-only binding."""
    B, H, Hkv = GROUPINGS[grouping]
    q, k, v, dout = inputs(B, 70, H, Hkv, 8, seed=1)
    out, lse = forward("cpu", q, k, v, B, H, Hkv, False)
    old_out, old_lse = K.attention_forward(q, k, v, B, H, Hkv)
    np.testing.assert_array_equal(out, old_out)
    np.testing.assert_array_equal(lse, old_lse)
    for got, old in zip(backward("cpu", q, k, v, out, lse, dout, B, H, Hkv, False),
                        K.attention_backward(q, k, v, out, lse, dout, B, H, Hkv)):
        np.testing.assert_array_equal(got, old)


# (H, Hkv, first_head, local heads): a shard straddling two kv heads, an MQA shard, one head
SHARDS = [(6, 2, 2, 3), (4, 1, 1, 2), (6, 3, 5, 1)]


@pytest.mark.parametrize("H,Hkv,first,Hs", SHARDS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_shard_equals_its_heads_of_the_whole(device, H, Hkv, first, Hs, precision):
    """A model shard (query heads [first, first + Hs), group = H / Hkv) gives exactly the whole
    attention's values for its heads, and the key/value gradients of the whole attention
    whose other heads get dout = 0 (they then add exact zeros)."""
    B, T, dh, bf16 = 2, 70, 8, precision == "bf16"
    q, k, v, dout = inputs(B, T, H, Hkv, dh, seed=H * 10 + first)
    cols = slice(first * dh, (first + Hs) * dh)
    masked = np.zeros_like(dout)
    masked[:, cols] = dout[:, cols]
    out, lse = forward(device, q, k, v, B, H, Hkv, bf16)
    dq, dk, dv = backward(device, q, k, v, out, lse, masked, B, H, Hkv, bf16)
    q_s, out_s, dout_s = (np.ascontiguousarray(a[:, cols]) for a in (q, out, dout))
    lse_s = np.ascontiguousarray(lse.reshape(B, H, T)[:, first:first + Hs]).reshape(-1)
    group = H // Hkv
    got_out, got_lse = forward(device, q_s, k, v, B, Hs, Hkv, bf16, first, group)
    np.testing.assert_array_equal(got_out, out_s)
    np.testing.assert_array_equal(got_lse, lse_s)
    got_dq, got_dk, got_dv = backward(device, q_s, k, v, out_s, lse_s, dout_s, B, Hs, Hkv, bf16, first, group)
    np.testing.assert_array_equal(got_dq, dq[:, cols])
    np.testing.assert_array_equal(got_dk, dk)
    np.testing.assert_array_equal(got_dv, dv)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_reruns_are_bit_identical(device, precision):
    """T = 300 crosses the CUDA kernel's 128-row chunks and the CPU's 64-row blocks."""
    B, T, H, Hkv, dh, bf16 = 2, 300, 4, 2, 16, precision == "bf16"
    q, k, v, dout = inputs(B, T, H, Hkv, dh, seed=7)
    first = forward(device, q, k, v, B, H, Hkv, bf16)
    again = forward(device, q, k, v, B, H, Hkv, bf16)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    grads = backward(device, q, k, v, *first, dout, B, H, Hkv, bf16)
    grads_again = backward(device, q, k, v, *first, dout, B, H, Hkv, bf16)
    for a, b in zip(grads, grads_again):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("slots,capacity,H,Hkv,dh", [(3, 70, 4, 1, 2), (2, 9, 6, 2, 8), (2, 70, 3, 3, 12)])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_attention_cached(device, slots, capacity, H, Hkv, dh, precision):
    """Ragged rows (as test_kernels.py): a prefill run past 64 rows where the capacity allows,
    decode rows of random slots, a run from mid-sequence. Cache entries past a row's position
    are random too: reading them would show."""
    bf16 = precision == "bf16"
    rng = np.random.default_rng(capacity * H + slots + dh)
    k_cache = f32(rng, slots * capacity, Hkv * dh)
    v_cache = f32(rng, slots * capacity, Hkv * dh)
    rows = [(0, p) for p in range(min(capacity, 67))]
    rows += [(int(rng.integers(slots)), int(rng.integers(capacity))) for _ in range(7)]
    rows += [(slots - 1, p) for p in range(capacity // 2, capacity)]
    slot = np.array([r[0] for r in rows], dtype=np.int32)
    pos = np.array([r[1] for r in rows], dtype=np.int32)
    q = f32(rng, len(rows), H * dh)
    cpu = K.attention_cached_on(q, slot, pos, k_cache, v_cache, slots, H, Hkv, bf16, "cpu")
    # on a GPU: the flash-decoding kernels (fast; bf16 p rounded before normalising, within the
    # same 1e-2) and the plain ones
    for kernels in ("fast", "plain") if device == "cuda" else ("fast",):
        with kernel_choice(kernels):
            out = K.attention_cached_on(q, slot, pos, k_cache, v_cache, slots, H, Hkv, bf16, device)
            again = K.attention_cached_on(q, slot, pos, k_cache, v_cache, slots, H, Hkv, bf16, device)
        np.testing.assert_array_equal(out, again)
        assert scaled_err(out, cpu, floor=max_abs(v_cache)) <= VS_CPU[precision][0], kernels
        if not bf16:  # the reference's cached attention has no bf16 rounding
            as4 = lambda a: a.astype(np.float64).reshape(slots, capacity, Hkv, dh)  # noqa: E731
            want = ref.attention_cached(q.astype(np.float64).reshape(-1, H, dh), slot, pos, as4(k_cache),
                                        as4(v_cache))
            assert scaled_err(out, want.reshape(len(rows), -1), floor=max_abs(v_cache)) <= VS_REF["fp32"], kernels
    if device == "cpu" and not bf16:  # the new binding is the existing CPU one
        np.testing.assert_array_equal(out, K.attention_cached(q, slot, pos, k_cache, v_cache, slots, H, Hkv))


# ---- bfloat16 storage (the CUDA bf16 mode's tensors) and the flash kernels ----
# head_dim 64 and 128 are the flash kernels' (cuda/flash_attention.cu); T = 67 and 130 cross
# their 64-row tiles unevenly.
STORAGE_CASES = [(grouping, T, dh) for grouping in GROUPINGS for T, dh in [(1, 64), (67, 64), (130, 128)]]


def rounded_inputs(B, T, H, Hkv, dh, seed):
    return [ref.round_bf16(a).astype(np.float32) for a in inputs(B, T, H, Hkv, dh, seed)]


@pytest.mark.parametrize("grouping,T,dh", STORAGE_CASES)
def test_bfloat16_storage_on_the_cpu_is_the_rounding_of_float32_storage(grouping, T, dh):
    """The CPU runs bf16 tensors on float32 twins and rounds the outputs: bit for bit the
    float32-storage results rounded (this is the oracle the GPU's bf16 storage is held to)."""
    B, H, Hkv = GROUPINGS[grouping]
    q, k, v, dout = rounded_inputs(B, T, H, Hkv, dh, seed=T + dh)
    out, lse = K.attention_forward_on(q, k, v, B, H, Hkv, 0, 0, True, "cpu", "bfloat16")
    wide_out, wide_lse = forward("cpu", q, k, v, B, H, Hkv, True)
    np.testing.assert_array_equal(out, ref.round_bf16(wide_out).astype(np.float32))
    np.testing.assert_array_equal(lse, wide_lse)
    grads = K.attention_backward_on(q, k, v, out, lse, dout, B, H, Hkv, 0, 0, True, "cpu", "bfloat16")
    wide_grads = backward("cpu", q, k, v, out, lse, dout, B, H, Hkv, True)
    for got, wide in zip(grads, wide_grads):
        np.testing.assert_array_equal(got, ref.round_bf16(wide).astype(np.float32))


@pytest.fixture(params=["fast", "plain"])
def cuda_kernels(request):
    """A usable GPU (else skipped: "no CUDA device"), with the fast (flash) or the plain
    attention kernels chosen for the test; the choice is restored after it."""
    if not palmcore.cuda_available():
        pytest.skip("no CUDA device")
    with kernel_choice(request.param):
        yield request.param


@pytest.mark.parametrize("grouping,T,dh", STORAGE_CASES)
def test_bfloat16_storage_on_cuda_matches_the_cpu_oracle(cuda_kernels, grouping, T, dh):
    """bf16 tensors on the GPU (flash where it applies, or the plain kernels) against the CPU's
    bf16 mode. Tolerances (scaled_err, floors as above): out and gradients 2e-2 (p and ds'
    rounded from float32 values that differ in the last bits, and flash normalises after p·V
    where the CPU normalises p first; plus the bf16 store of each result, 2^-9 of it); lse 1e-4
    of the largest score (flash computes exp2 of prescaled scores). Results must also be much
    closer to the CPU's bf16 results than to its fp32 ones (ratio <= 1/4), and reruns identical."""
    B, H, Hkv = GROUPINGS[grouping]
    q, k, v, dout = rounded_inputs(B, T, H, Hkv, dh, seed=T * 7 + dh)
    run_forward = lambda: K.attention_forward_on(q, k, v, B, H, Hkv, 0, 0, True, "cuda", "bfloat16")  # noqa: E731
    out, lse = run_forward()
    cpu_out, cpu_lse = K.attention_forward_on(q, k, v, B, H, Hkv, 0, 0, True, "cpu", "bfloat16")
    args = (q, k, v, cpu_out, cpu_lse, dout, B, H, Hkv, 0, 0, True)
    grads = K.attention_backward_on(*args, "cuda", "bfloat16")
    cpu_grads = K.attention_backward_on(*args, "cpu", "bfloat16")
    _, _, want_grads, s_max = reference(q, k, v, dout, B, T, H, Hkv, dh, True)
    floor_g = max_abs(*want_grads)
    assert scaled_err(out, cpu_out, floor=max_abs(v)) <= 2e-2
    assert scaled_err(lse, cpu_lse, floor=s_max) <= 1e-4
    for got, cpu in zip(grads, cpu_grads):
        assert scaled_err(got, cpu, floor=floor_g) <= 2e-2
    if T > 1:  # rounded, at the kernel's points: flash's forward rounds before normalising
        fp32_out, _ = forward("cpu", q, k, v, B, H, Hkv, False)
        fp32_grads = backward("cpu", q, k, v, cpu_out, cpu_lse, dout, B, H, Hkv, False)
        near = flash_forward_oracle(q, k, v, B, T, H, Hkv, dh) if cuda_kernels == "fast" else cpu_out
        assert fro(out, near) <= NEAR_FAR * fro(fp32_out, near)
        for got, cpu, fp32 in zip(grads, cpu_grads, fp32_grads):  # the backward rounds normalised p
            assert fro(got, cpu) <= NEAR_FAR * fro(fp32, cpu)
    for a, b in zip((out, lse), run_forward()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(grads, K.attention_backward_on(*args, "cuda", "bfloat16")):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("H,Hkv,dh", [(16, 1, 128), (8, 2, 64), (4, 4, 96)])
def test_bf16_decode_on_cuda_matches_the_cpu_oracle(cuda_kernels, H, Hkv, dh):
    """A bf16-mode decode step of 5 sequences at ragged positions of a 300-position cache (the
    flash-decoding kernels split it), against the CPU's bf16 cached attention: 1e-2 of max|v|
    (p rounded to bf16 before normalising instead of after: at most 2 · 2^-9 · max|v| apart),
    much closer to an oracle rounding where the kernel rounds (decode_oracle for flash-decoding,
    the CPU otherwise) than to the CPU's fp32 result (ratio <= 1/4), and reruns bit-identical."""
    rng = np.random.default_rng(H * dh)
    slots, capacity = 5, 300
    k_cache, v_cache = (ref.round_bf16(f32(rng, slots * capacity, Hkv * dh)).astype(np.float32) for _ in range(2))
    slot = np.arange(slots, dtype=np.int32)
    pos = np.array([0, 63, 64, 201, 299], np.int32)
    q = ref.round_bf16(f32(rng, slots, H * dh)).astype(np.float32)
    cpu = K.attention_cached_on(q, slot, pos, k_cache, v_cache, slots, H, Hkv, True, "cpu")
    out = K.attention_cached_on(q, slot, pos, k_cache, v_cache, slots, H, Hkv, True, "cuda")
    assert scaled_err(out, cpu, floor=max_abs(v_cache)) <= 1e-2
    fp32 = K.attention_cached_on(q, slot, pos, k_cache, v_cache, slots, H, Hkv, False, "cpu")
    near = decode_oracle(q, slot, pos, k_cache, v_cache, slots, H, Hkv) if cuda_kernels == "fast" else cpu
    assert fro(out, near) <= NEAR_FAR * fro(fp32, near)  # rounded, where the kernel rounds
    np.testing.assert_array_equal(out, K.attention_cached_on(q, slot, pos, k_cache, v_cache, slots, H, Hkv, True,
                                                             "cuda"))
