"""The PaLM model of PALM_SPEC.md in float64 NumPy: forward pass, loss and analytic gradients.

This module is the oracle of the tests and the spec written as code: it favours plain,
readable math over speed. Every piece has its forward and its backward side by side; a
``*_forward`` returns ``(output, cache)`` and the matching ``*_backward`` takes the gradient
of the output and that cache and returns the gradients of the inputs and weights.

Conventions (as in the spec): row vectors, ``y = x @ W`` with ``W`` shaped ``[in, out]``.
Shapes: B batch, T positions, V vocabulary, D width, H query heads, Hkv key/value heads,
G = H // Hkv query heads per key/value head, dh head width, F SwiGLU hidden width.

Public entry points: :func:`forward` (logits) and :func:`loss_and_grads`. This module
imports only NumPy; ``cfg`` is anything with PaLMConfig's fields.

``precision="bf16"`` applies PALM_SPEC "Precision" at the runtime's rounding points (listed
above ``Model::run_forward`` in csrc/model.cpp): the GEMM weights and the embedding are
read as R(W), and the activations the spec stores in bf16 are rounded where they are made,
R = round to the nearest bfloat16, ties to even. Everything else stays float64, so the
runtime's bf16 mode is compared with the same rounding, not with float32 arithmetic.
"""

from __future__ import annotations

import numpy as np


# --------------------------------------------------------------------------- helpers

def _rows(x):
    """[..., n] -> [rows, n]: the batch and position axes flattened, for weight gradients."""
    return x.reshape(-1, x.shape[-1])


def sigmoid(u):
    """1 / (1 + exp(-u)), written with tanh so it never overflows."""
    return 0.5 * (1.0 + np.tanh(0.5 * u))


def logsumexp(z):
    """log(sum(exp(z))) over the last axis, shifted by the max for stability."""
    m = z.max(axis=-1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=-1, keepdims=True)))[..., 0]


def softmax(z):
    """exp(z - logsumexp(z)) over the last axis (entries at -inf get probability 0)."""
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def round_bf16(x):
    """x rounded to the nearest bfloat16 (through float32, ties to even), as float64."""
    f = np.asarray(x, dtype=np.float32)
    u = f.view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    out = u.astype(np.uint32).view(np.float32)
    return np.where(np.isnan(f), f, out).astype(np.float64)


def quantize_q8(w, transposed: bool = False):
    """w' = q · s of the int8 decode weights (palmcore/compact_weights.h), as float32: per block of
    32 consecutive weights along the reduction axis (down the rows of w [k, n]; along the rows of
    w [n, k] when transposed), s = max|w| / 127 and q = round(w / s) in [-127, 127], ties to even,
    all in float32 as the runtime computes them (an all-zero block gives zeros)."""
    w = np.asarray(w, dtype=np.float32)
    w = w.T if transposed else w
    out = np.zeros_like(w)
    for first in range(0, w.shape[0], 32):
        block = w[first:first + 32]
        scale = np.abs(block).max(axis=0) / np.float32(127)
        safe = np.where(scale == 0, np.float32(1), scale)
        q = np.clip(np.rint(block / safe), -127, 127).astype(np.float32)
        out[first:first + 32] = np.where(scale == 0, np.float32(0), q * scale)
    return out.T if transposed else out


def compact_weights(params: dict, weights: str) -> dict:
    """The float32 parameters as PaLM.set_weights(weights) computes with them: the dense layers'
    GEMM weights and the embedding through bf16 rounding or quantize_q8, the rest unchanged."""
    gemm = ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w_gate", "mlp.w_up", "mlp.w_down")
    convert = {"fp32": lambda w, t: np.asarray(w, np.float32),
               "bf16": lambda w, t: round_bf16(w).astype(np.float32), "int8": quantize_q8}[weights]
    return {n: convert(w, n == "embed") if n == "embed" or n.endswith(gemm) else np.asarray(w, np.float32)
            for n, w in params.items()}


def _identity(x):
    return x


def _rounding(precision: str):
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    return round_bf16 if precision == "bf16" else _identity


# --------------------------------------------------------------------------- layer norm

def layernorm_forward(x, g, eps):
    """LN(x, g) = (x - mean(x)) / sqrt(var(x) + eps) * g over the last axis.

    Biased variance (divide by D), scale only, no bias."""
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    rstd = 1.0 / np.sqrt((xc * xc).mean(axis=-1, keepdims=True) + eps)
    xhat = xc * rstd
    return xhat * g, (xhat, rstd, g)


def layernorm_backward(dy, cache):
    """With xhat = (x - mu) * rstd and y = xhat * g:

        dg     = sum over all rows of dy * xhat
        dxhat  = dy * g
        dx     = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))

    The first mean is the path through mu, the second the path through var
    (d rstd / dx_k = -rstd^3 (x_k - mu) / D)."""
    xhat, rstd, g = cache
    dg = _rows(dy * xhat).sum(axis=0)
    dxhat = dy * g
    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                 - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    return dx, dg


# --------------------------------------------------------------------------- rotary embedding

def rope_angles(T, dh, base):
    """theta[p, i] = p * f_i with f_i = base^(-2i/dh), for p in [0, T), i in [0, dh/2)."""
    f = base ** (-2.0 * np.arange(dh // 2) / dh)
    return np.arange(T, dtype=np.float64)[:, None] * f[None, :]          # [T, dh/2]


def rope_forward(x, theta):
    """Rotate-half RoPE on x [B, T, heads, dh] with angles theta [T, dh/2]:

        x1, x2 = x[..., :dh/2], x[..., dh/2:]
        rope(x) = concat(x1 cos(theta) - x2 sin(theta),  x2 cos(theta) + x1 sin(theta))

    i.e. each pair (x1_i, x2_i) is rotated by theta_i. No weights, so no cache."""
    cos = np.cos(theta)[None, :, None, :]
    sin = np.sin(theta)[None, :, None, :]
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def rope_backward(dy, theta):
    """RoPE is a rotation of each pair by theta; its transpose is the rotation by -theta."""
    return rope_forward(dy, -theta)


# --------------------------------------------------------------------------- attention

def attention_forward(q, k, v, rnd=_identity):
    """Causal grouped-query attention. q [B, T, H, dh]; k, v [B, T, Hkv, dh] -> [B, T, H, dh].

    Query head j = kv * G + g reads key/value head kv = j // G. For each head:
        s[i, t] = q_i . k_t / sqrt(dh)   for t <= i (causal), -inf otherwise
        p[i, :] = rnd(softmax(s[i, :]))
        o_i     = rnd(sum_t p[i, t] v_t)"""
    B, T, H, dh = q.shape
    Hkv = k.shape[2]
    qg = q.reshape(B, T, Hkv, H // Hkv, dh)                  # [b, i, kv, g, d]
    s = np.einsum("bikgd,btkd->bkgit", qg, k) / np.sqrt(dh)
    causal = np.tril(np.ones((T, T), dtype=bool))            # causal[i, t] = t <= i
    p = rnd(softmax(np.where(causal, s, -np.inf)))
    o = rnd(np.einsum("bkgit,btkd->bikgd", p, v))
    return o.reshape(B, T, H, dh), (qg, k, v, p, o, rnd)


def attention_cached(q, slots, positions, k_cache, v_cache):
    """Attention of ragged query rows over a key/value cache. q [R, H, dh]; k_cache, v_cache
    [slots, capacity, Hkv, dh]. Row r reads slot slots[r] at positions 0..positions[r]:
        o_r = sum_{t <= p} softmax_t(q_r . K[b, t] / sqrt(dh)) V[b, t]      -> [R, H, dh]"""
    R, H, dh = q.shape
    Hkv = k_cache.shape[2]
    out = np.empty_like(q)
    for r in range(R):
        k = k_cache[slots[r], : positions[r] + 1]                 # [t, kv, d]
        v = v_cache[slots[r], : positions[r] + 1]
        s = np.einsum("kgd,tkd->kgt", q[r].reshape(Hkv, H // Hkv, dh), k) / np.sqrt(dh)
        out[r] = np.einsum("kgt,tkd->kgd", softmax(s), v).reshape(H, dh)
    return out


def online_softmax(s, v, passes, rnd=_identity):
    """softmax(s) @ v as an online-softmax (flash) kernel computes it, rounding where it rounds.
    s [..., J] (masked scores -inf), v [..., J, dh] (broadcast against s's leading axes). The keys
    are cut into `passes`, each a list of chunks (arrays of key indices) worked in order. Within a
    pass, with m the running max of the scores of its chunks so far:
        alpha = exp(m_before - m),  l = l alpha + sum_j exp(s_j - m),  a = a alpha + sum_j rnd(exp(s_j - m)) v_j
    and the passes are merged exactly: M = max m,  out = sum a exp(m - M) / sum l exp(m - M).
    rnd rounds the exponentials relative to the running max, before normalising: with rounding
    this differs from attention_forward's rnd(softmax(s)) by up to an ulp of each p (the oracle
    the GPU's flash and flash-decoding kernels are held to); without, it is softmax(s) @ v."""
    lead = s.shape[:-1]
    num = np.zeros(lead + (v.shape[-1],))
    den = np.zeros(lead)
    top = np.full(lead, -np.inf)
    merged = []
    for chunks in passes:
        m = np.full(lead, -np.inf)
        l, a = np.zeros(lead), np.zeros(lead + (v.shape[-1],))
        for keys in chunks:
            m_new = np.maximum(m, s[..., keys].max(axis=-1))
            base = np.where(np.isfinite(m_new), m_new, 0.0)   # no key yet: every p and alpha is 0
            alpha = np.exp(m - base)
            e = np.exp(s[..., keys] - base[..., None])
            l = l * alpha + e.sum(axis=-1)
            a = a * alpha[..., None] + np.einsum("...j,...jd->...d", rnd(e), v[..., keys, :])
            m = m_new
        merged.append((m, l, a))
        top = np.maximum(top, m)
    for m, l, a in merged:
        w = np.where(np.isfinite(m), np.exp(m - top), 0.0)
        den += l * w
        num += a * w[..., None]
    return num / den[..., None]


def attention_backward(do, cache):
    """Gradients of attention_forward, from do [B, T, H, dh]:

        dv_t     = sum_i p[i, t] do_i                 (also summed over the G heads sharing kv)
        dp[i, t] = do_i . v_t
        D_i      = do_i . o_i                         (= sum_t p[i, t] dp[i, t])
        ds'      = rnd(p * (dp - D) / sqrt(dh))       (softmax backward; masked p = 0)
        dq_i     = rnd(sum_t ds'[i, t] k_t)
        dk_t     = rnd(sum_i ds'[i, t] q_i)           (also summed over the G heads)
    and dv rounded too (rnd is the identity in float32)."""
    qg, k, v, p, o, rnd = cache
    B, T, Hkv, G, dh = qg.shape
    dog = do.reshape(B, T, Hkv, G, dh)
    dv = rnd(np.einsum("bkgit,bikgd->btkd", p, dog))
    dp = np.einsum("bikgd,btkd->bkgit", dog, v)
    D = np.einsum("bikgd,bikgd->bkgi", dog, o)[..., None]
    ds = rnd(p * (dp - D) / np.sqrt(dh))
    dq = rnd(np.einsum("bkgit,btkd->bikgd", ds, k))
    dk = rnd(np.einsum("bkgit,bikgd->btkd", ds, qg))
    return dq.reshape(B, T, Hkv * G, dh), dk, dv


# --------------------------------------------------------------------------- SwiGLU MLP

def silu(u):
    """silu(u) = u * sigmoid(u)."""
    return u * sigmoid(u)


def silu_grad(u):
    """d silu / du = sigmoid(u) * (1 + u * (1 - sigmoid(u)))."""
    s = sigmoid(u)
    return s * (1.0 + u * (1.0 - s))


def swiglu_forward(h, w_gate, w_up, w_down, rnd=_identity):
    """mlp(h) = (silu(h @ w_gate) * (h @ w_up)) @ w_down, with a, b and m rounded by rnd."""
    a = rnd(h @ w_gate)
    b = rnd(h @ w_up)
    m = rnd(silu(a) * b)
    return m @ w_down, (h, a, b, m, w_gate, w_up, w_down, rnd)


def swiglu_backward(dy, cache):
    """With a = h @ w_gate, b = h @ w_up, m = silu(a) * b, y = m @ w_down:

        dw_down = m^T dy,        dm = dy @ w_down^T
        da = dm * b * silu'(a),  db = dm * silu(a)
        dw_gate = h^T da,        dw_up = h^T db
        dh = da @ w_gate^T + db @ w_up^T"""
    h, a, b, m, w_gate, w_up, w_down, rnd = cache
    dw_down = _rows(m).T @ _rows(dy)
    dm = rnd(dy @ w_down.T)
    da = rnd(dm * b * silu_grad(a))
    db = rnd(dm * silu(a))
    dw_gate = _rows(h).T @ _rows(da)
    dw_up = _rows(h).T @ _rows(db)
    dh = da @ w_gate.T + db @ w_up.T
    return dh, dw_gate, dw_up, dw_down


def moe_forward(h, p, k, rnd=_identity):
    """PALM_SPEC "Sparse activation" over rows h [N, D] (float32 router, never rounded):

        r = h @ router;  pr = softmax(r);  S = the k largest pr (ties: lower expert id)
        w_e = pr_e / sum_S pr;  mlp = sum_{e in S} w_e · swiglu_e(h)

    Returns mlp [N, D], the layer's (load balance, router z) losses
    (E · sum_e f_e P_e with f_e the share of the N·k assignments, P_e the mean pr_e; mean lse(r)²),
    and the cache for moe_backward."""
    router, wg, wu, wd = p["mlp.router"], p["mlp.experts.w_gate"], p["mlp.experts.w_up"], p["mlp.experts.w_down"]
    N, E = h.shape[0], router.shape[1]
    r = h @ router
    pr, lse = softmax(r), logsumexp(r)
    chosen = np.argsort(-pr, axis=1, kind="stable")[:, :k]      # [N, k], ties to the lower id
    picked = np.take_along_axis(pr, chosen, axis=1)
    w = picked / picked.sum(axis=1, keepdims=True)
    out = np.zeros_like(h)
    experts = []
    for e in range(E):
        rows, slots = np.nonzero(chosen == e)
        if rows.size == 0:
            experts.append(None)
            continue
        y, c = swiglu_forward(h[rows], wg[e], wu[e], wd[e], rnd)
        out[rows] += w[rows, slots][:, None] * y
        experts.append((rows, slots, y, c))
    f = np.bincount(chosen.ravel(), minlength=E) / (N * k)
    balance = float(E * np.sum(f * pr.mean(axis=0)))
    z = float(np.mean(lse * lse))
    return out, balance, z, (h, router, pr, lse, chosen, picked, w, f, experts, rnd)


def moe_backward(dmlp, cache, balance_weight, z_weight):
    """Gradients of moe_forward's mlp (given d mlp, already rounded as every GEMM input) plus
    balance_weight · balance + z_weight · z: (dh, grads by short name). The router learns
    through w (its renormalization included), never through the choice of S; f has no gradient:

        dy_e = R(w_e · dmlp);  dw_e = dmlp · y_e
        dpr_e = (dw_e - sum_S dw_s w_s) / sum_S pr  (e in S)  +  balance_weight · E · f_e / N
        dr = pr (dpr - pr · dpr) + z_weight · 2 lse · pr / N;  drouter = h^T dr;  dh += dr router^T"""
    h, router, pr, lse, chosen, picked, w, f, experts, rnd = cache
    N, E = pr.shape
    dh = np.zeros_like(h)
    dw = np.zeros_like(w)
    g = {"mlp.experts.w_gate": None, "mlp.experts.w_up": None, "mlp.experts.w_down": None}
    shapes = {name: [] for name in g}
    for e, item in enumerate(experts):
        if item is None:
            c = None
        else:
            rows, slots, y, c = item
            dw[rows, slots] = np.sum(dmlp[rows] * y, axis=1)
            dh_e, dg, du, dd = swiglu_backward(rnd(w[rows, slots][:, None] * dmlp[rows]), c)
            dh[rows] += dh_e
        for name, value in zip(shapes, (dg, du, dd) if c is not None else (None, None, None)):
            shapes[name].append(value)
    D, Fe = h.shape[1], next(i for i in experts if i is not None)[3][4].shape[1]
    for name, pieces in shapes.items():
        shape = (Fe, D) if name.endswith("w_down") else (D, Fe)
        g[name] = np.stack([piece if piece is not None else np.zeros(shape) for piece in pieces])
    dpr = np.zeros_like(pr)
    np.put_along_axis(dpr, chosen, (dw - np.sum(dw * w, axis=1, keepdims=True)) / picked.sum(axis=1, keepdims=True),
                      axis=1)
    dpr += balance_weight * E * f[None, :] / N
    dr = pr * (dpr - np.sum(pr * dpr, axis=1, keepdims=True)) + z_weight * 2.0 * lse[:, None] * pr / N
    g["mlp.router"] = h.T @ dr
    return dh + dr @ router.T, g


# --------------------------------------------------------------------------- loss

def cross_entropy_forward(z, y, z_loss):
    """Cross-entropy with z-loss over the counted positions (targets y >= 0).

        lse    = logsumexp(z)            per position
        ce_pos = lse - z[y]
        loss   = mean over counted of (ce_pos + z_loss * lse^2)
        ce     = mean over counted of ce_pos

    Returns (loss, ce, N, cache); with N = 0 counted positions, loss = ce = 0."""
    counted = y >= 0
    n = int(counted.sum())
    lse = logsumexp(z)
    z_y = np.take_along_axis(z, np.where(counted, y, 0)[..., None], axis=-1)[..., 0]
    ce_pos = lse - z_y
    if n == 0:
        loss = ce = 0.0
    else:
        loss = float((ce_pos + z_loss * lse * lse)[counted].sum() / n)
        ce = float(ce_pos[counted].sum() / n)
    return loss, ce, n, (z, y, counted, n, lse, z_loss)


def cross_entropy_backward(cache):
    """d loss / dz at a counted position, using d lse / dz = softmax(z):

        dz = (softmax(z) - onehot(y) + 2 * z_loss * lse * softmax(z)) / N

    and 0 at ignored positions (all 0 when N = 0)."""
    z, y, counted, n, lse, z_loss = cache
    if n == 0:
        return np.zeros_like(z)
    p = softmax(z)
    dz = p * (1.0 + 2.0 * z_loss * lse)[..., None]
    b_idx, t_idx = np.nonzero(counted)
    dz[b_idx, t_idx, y[b_idx, t_idx]] -= 1.0
    return dz * counted[..., None] / n


# --------------------------------------------------------------------------- one block

def block_forward(x, p, cfg, theta, rnd=_identity):
    """PaLM's parallel block: h = LN(x); x + attention(h) + mlp(h).

    p: this layer's weights by short name ("norm.scale", "attn.wq", ...), the GEMM weights
    already rounded in the bf16 mode; rnd rounds the activations stored in bf16."""
    B, T, _ = x.shape
    H, Hkv, dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    h, ln = layernorm_forward(x, p["norm.scale"], cfg.norm_eps)
    h = rnd(h)
    q = rnd(h @ p["attn.wq"]).reshape(B, T, H, dh)
    k = rnd(h @ p["attn.wk"]).reshape(B, T, Hkv, dh)
    v = rnd(h @ p["attn.wv"]).reshape(B, T, Hkv, dh)
    o, att = attention_forward(rnd(rope_forward(q, theta)), rnd(rope_forward(k, theta)), v, rnd)
    o = o.reshape(B, T, H * dh)                               # concat_heads
    attn = o @ p["attn.wo"]
    if "mlp.router" in p:  # a sparse layer: (balance, router z) go to the loss
        mlp, balance, z, mc = moe_forward(_rows(h), p, cfg.expert_top_k, rnd)
        mlp, aux = mlp.reshape(h.shape), (balance, z)
    else:
        mlp, mc = swiglu_forward(h, p["mlp.w_gate"], p["mlp.w_up"], p["mlp.w_down"], rnd)
        aux = None
    return x + attn + mlp, (h, ln, o, att, mc, p, theta, rnd, aux)


def block_backward(dout, cache, aux_weights=(0.0, 0.0)):
    """out = x + attn(h) + mlp(h), h = LN(x): dx = dout + LN_backward(dh_attn + dh_mlp).
    The products read dout rounded (rnd), while dx itself is not. A sparse layer's auxiliary
    losses enter with aux_weights (balance, z)."""
    h, ln, o, att, mc, p, theta, rnd, aux = cache
    B, T, _ = h.shape
    g = {}
    dr = rnd(dout)
    # attn = o @ wo
    g["attn.wo"] = _rows(o).T @ _rows(dr)
    do = rnd(dr @ p["attn.wo"].T).reshape(B, T, -1, att[0].shape[-1])
    dq_rot, dk_rot, dv = attention_backward(do, att)
    dq = rnd(rope_backward(dq_rot, theta)).reshape(B, T, -1)
    dk = rnd(rope_backward(dk_rot, theta)).reshape(B, T, -1)
    dv = dv.reshape(B, T, -1)
    # q, k, v = h @ wq, h @ wk, h @ wv
    g["attn.wq"] = _rows(h).T @ _rows(dq)
    g["attn.wk"] = _rows(h).T @ _rows(dk)
    g["attn.wv"] = _rows(h).T @ _rows(dv)
    dh = dq @ p["attn.wq"].T + dk @ p["attn.wk"].T + dv @ p["attn.wv"].T
    if aux is not None:
        dh_mlp, gm = moe_backward(_rows(dr), mc, *aux_weights)
        dh_mlp = dh_mlp.reshape(h.shape)
        g.update(gm)
    else:
        dh_mlp, g["mlp.w_gate"], g["mlp.w_up"], g["mlp.w_down"] = swiglu_backward(dr, mc)
    dx_ln, g["norm.scale"] = layernorm_backward(dh + dh_mlp, ln)
    return dout + dx_ln, g


# --------------------------------------------------------------------------- whole model

def _layer(params, i):
    """Layer i's weights by short name: "layers.{i}.attn.wq" -> "attn.wq"."""
    prefix = f"layers.{i}."
    return {name[len(prefix):]: w for name, w in params.items() if name.startswith(prefix)}


def _check_params(params, cfg):
    """float64 copies of the parameters, after checking names and shapes against the spec."""
    shapes = cfg.param_shapes()
    missing = [n for n in shapes if n not in params]
    unknown = [n for n in params if n not in shapes]
    if missing or unknown:
        raise ValueError(f"parameter names do not match the spec: missing {missing}, "
                         f"unknown {unknown}")
    out = {}
    for name, shape in shapes.items():
        w = np.asarray(params[name], dtype=np.float64)
        if w.shape != tuple(shape):
            raise ValueError(f"{name}: shape {w.shape}, the spec wants {tuple(shape)}")
        out[name] = w
    return out


def _check_ids(a, what, cfg, allow_negative):
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"{what} must be [B, T], got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{what} is empty: shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{what} must be integers, got dtype {a.dtype}")
    a = a.astype(np.int64)
    low = a.min() if not allow_negative else 0
    if low < 0 or a.max() >= cfg.vocab_size:
        raise ValueError(f"{what} out of range [0, {cfg.vocab_size}): "
                         f"min {a.min()}, max {a.max()}")
    return a


def _gemm_params(params, rnd):
    """What the products read: every weight but the norm scales and routers (float32) through rnd."""
    return {n: w if n.endswith(("norm.scale", "mlp.router")) else rnd(w) for n, w in params.items()}


def _forward(params, cfg, tokens, rnd=_identity):
    """Logits [B, T, V] and the caches for _backward; params already float64 and checked."""
    B, T = tokens.shape
    theta = rope_angles(T, cfg.head_dim, cfg.rope_base)
    w = _gemm_params(params, rnd)
    x = w["embed"][tokens]                                    # no embedding scaling
    blocks = []
    for i in range(cfg.n_layers):
        x, c = block_forward(x, _layer(w, i), cfg, theta, rnd)
        blocks.append(c)
    hf, ln = layernorm_forward(x, params["final_norm.scale"], cfg.norm_eps)
    hf = rnd(hf)
    z = hf @ w["embed"].T / np.sqrt(cfg.d_model)              # tied output embedding
    return z, (tokens, blocks, hf, ln, w, rnd)


def _backward(dz, params, cfg, caches, aux_scale=1.0):
    """Gradients of all parameters, by spec name, from d loss / d logits; the sparse layers'
    auxiliary losses enter averaged over those layers, scaled by aux_scale."""
    tokens, blocks, hf, ln, w, rnd = caches
    sparse = max(1, cfg.n_sparse_layers)
    aux_weights = (aux_scale * cfg.router_aux_loss / sparse, aux_scale * cfg.router_z_loss / sparse)
    s = 1.0 / np.sqrt(cfg.d_model)
    grads = {}
    dz = rnd(dz)
    # z = hf @ embed^T * s: the output half of the tied embedding's gradient
    d_embed = _rows(dz).T @ _rows(hf) * s                     # [V, D]
    dx, grads["final_norm.scale"] = layernorm_backward(dz @ w["embed"] * s, ln)
    for i in reversed(range(cfg.n_layers)):
        dx, g = block_backward(dx, blocks[i], aux_weights)
        for short, value in g.items():
            grads[f"layers.{i}.{short}"] = value
    # x = embed[tokens]: the input half, a scatter-add (a token may repeat)
    np.add.at(d_embed, tokens.ravel(), _rows(dx))
    grads["embed"] = d_embed
    return {name: grads[name] for name in cfg.param_shapes()}  # the spec's order


def forward(params: dict, cfg, tokens, precision: str = "fp32") -> np.ndarray:
    """Logits float64 [B, T, V] for tokens [B, T] at positions 0..T-1."""
    rnd = _rounding(precision)
    params = _check_params(params, cfg)
    tokens = _check_ids(tokens, "tokens", cfg, allow_negative=False)
    return _forward(params, cfg, tokens, rnd)[0]


def loss_and_grads(params: dict, cfg, tokens, targets, precision: str = "fp32") -> dict:
    """Loss (cross-entropy + z-loss, mean over targets >= 0) and its gradient for every parameter.

    With sparse layers the loss also holds router_aux_loss · balance + router_z_loss · router z,
    each averaged over the sparse layers (reported as "balance" and "router_z"; not in "ce").

    Returns {"loss": float, "ce": float, "tokens": N, "grads": {spec name: float64 array}, "balance",
    "router_z"}; with no counted target, loss = ce = 0.0, tokens = 0 and every gradient is zero."""
    params = _check_params(params, cfg)
    tokens = _check_ids(tokens, "tokens", cfg, allow_negative=False)
    targets = _check_ids(targets, "targets", cfg, allow_negative=True)
    if targets.shape != tokens.shape:
        raise ValueError(f"targets shape {targets.shape} != tokens shape {tokens.shape}")
    z, caches = _forward(params, cfg, tokens, _rounding(precision))
    loss, ce, n, ce_cache = cross_entropy_forward(z, targets, cfg.z_loss)
    aux = [c[-1] for c in caches[1] if c[-1] is not None]
    balance = float(np.mean([a[0] for a in aux])) if aux else 0.0
    router_z = float(np.mean([a[1] for a in aux])) if aux else 0.0
    if n:
        loss += cfg.router_aux_loss * balance + cfg.router_z_loss * router_z
    grads = _backward(cross_entropy_backward(ce_cache), params, cfg, caches, aux_scale=1.0 if n else 0.0)
    return {"loss": loss, "ce": ce, "tokens": n, "grads": grads, "balance": balance, "router_z": router_z}


# --------------------------------------------------------------------------- optimizers

def global_norm(grads: dict) -> float:
    """sqrt of the sum of squares over every gradient."""
    return float(np.sqrt(sum((np.asarray(g, np.float64) ** 2).sum() for g in grads.values())))


def adafactor_update(x, g, m, v, k, lr, beta1=0.9, decay=0.8, clip=1.0, eps=1e-30, min_scale=1e-3):
    """PaLM's Adafactor on one tensor at step k (from 1); returns new (x, m, v):

        beta2 = 1 - k^-decay
        v = beta2 v + (1 - beta2)(g^2 + eps);  u = g / sqrt(v)
        u = u / max(1, RMS(u) / clip);  m = beta1 m + (1 - beta1) u
        x = x - lr max(min_scale, RMS(x)) m - lr^2 x"""
    rms = lambda a: np.sqrt(np.mean(a * a))  # noqa: E731
    beta2 = 1.0 - k ** -decay
    v = beta2 * v + (1.0 - beta2) * (g * g + eps)
    u = g / np.sqrt(v)
    u = u / max(1.0, rms(u) / clip)
    m = beta1 * m + (1.0 - beta1) * u
    return x - lr * max(min_scale, rms(x)) * m - lr * lr * x, m, v


def adamw_update(x, g, m, v, k, lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0):
    """AdamW with bias correction and decoupled decay on one tensor at step k; new (x, m, v)."""
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    step = (m / (1.0 - beta1 ** k)) / (np.sqrt(v / (1.0 - beta2 ** k)) + eps)
    return x - lr * step - lr * weight_decay * x, m, v


# ---- sampling (PALM_SPEC.md "Sampling") ----

_MASK32 = 0xFFFFFFFF


def philox4x32(key: int, counter: tuple) -> tuple:
    """Philox4x32-10 on a 64-bit key and four 32-bit counter words (Salmon et al., SC 2011)."""
    k0, k1 = key & _MASK32, (key >> 32) & _MASK32
    c0, c1, c2, c3 = counter
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0, p1 & _MASK32, (p0 >> 32) ^ c3 ^ k1, p0 & _MASK32)
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    return c0, c1, c2, c3


def uniform01(key: int, stream: int, index: int) -> float:
    """The uniform [0, 1) draw (key, stream, index): 53 bits of the first two output words."""
    w = philox4x32(key, (index & _MASK32, index >> 32, stream & _MASK32, stream >> 32))
    return float((((w[0] << 21) ^ w[1]) & ((1 << 53) - 1)) * 2.0**-53)


def sampling_distribution(z, seen=(), temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0):
    """Steps 1-4 of the spec on logits z [V]: (kept token ids ascending, their renormalized
    probabilities), float64 throughout."""
    z = np.array(z, dtype=np.float64)
    seen = np.unique(np.asarray(seen, dtype=np.int64))
    if repetition_penalty != 1.0 and seen.size:
        z[seen] = np.where(z[seen] > 0, z[seen] / repetition_penalty, z[seen] * repetition_penalty)
    if temperature == 0:
        return np.array([int(np.argmax(z))]), np.array([1.0])
    w = z / temperature
    order = np.lexsort((np.arange(len(w)), -w))       # by value descending, ties: lower id first
    if 0 < top_k < len(w):
        order = order[:top_k]
    p = np.exp(w[order] - w[order].max())
    total = p.sum()
    if top_p < 1.0:
        # the shortest prefix whose mass reaches top_p (the crossing token is kept)
        reached = np.cumsum(p) >= top_p * total
        keep = int(np.argmax(reached)) + 1 if reached.any() else len(p)
        order, p = order[:keep], p[:keep]
    ids = np.argsort(order, kind="stable")
    return order[ids], p[ids] / p.sum()


def sample(z, seen=(), temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=0, row=0, step=0):
    """Step 5: walk the kept tokens in ascending id order and take the first whose running
    probability sum exceeds u = uniform01(seed, row, step)."""
    ids, probs = sampling_distribution(z, seen, temperature, top_k, top_p, repetition_penalty)
    if len(ids) == 1:
        return int(ids[0])
    u = uniform01(seed, row, step)
    running = np.cumsum(probs)
    above = np.nonzero(running > u)[0]
    return int(ids[above[0]] if above.size else ids[-1])
