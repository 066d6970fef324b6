"""A plain PyTorch (eager) implementation of PALM_SPEC.md, for benchmark comparisons only.

This is what a competent PyTorch user would write: torch.nn.functional ops,
``F.scaled_dot_product_attention(is_causal=True)`` for attention (the shared key/value
head expanded to every query head), no ``torch.compile``, no hand-fused kernels. It is not
part of palmcore and torch is never a dependency of the package or its CI.

Weights come from a palmcore ``state_dict`` ({spec name: numpy array}, shapes as in
``cfg.param_shapes()``, ``[in, out]`` layout, ``y = x @ W``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


class TorchPaLM:
    def __init__(self, cfg, state_dict, threads: int, dtype=torch.float32, device: str = "cpu"):
        torch.set_num_threads(int(threads))
        self.cfg = cfg
        self.dtype = dtype
        self.device = torch.device(device)
        shapes = cfg.param_shapes()
        missing = set(shapes) - set(state_dict)
        extra = set(state_dict) - set(shapes)
        if missing or extra:
            raise ValueError(f"state_dict mismatch: missing {sorted(missing)}, "
                             f"unexpected {sorted(extra)}")
        self.params: dict[str, torch.Tensor] = {}
        for name, shape in shapes.items():
            arr = np.asarray(state_dict[name])
            if tuple(arr.shape) != tuple(shape):
                raise ValueError(f"{name}: shape {arr.shape}, expected {shape}")
            t = torch.tensor(arr, dtype=dtype, device=self.device)  # copies: palmcore's buffers are never aliased
            t.requires_grad_(True)
            self.params[name] = t
        self._rope_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- pieces -------------------------------------------------------------------------

    def _rope_tables(self, T: int):
        """cos/sin of θ = p · rope_base^(-2i/dh), shaped [T, dh/2] (computed in float64)."""
        if T not in self._rope_cache:
            dh = self.cfg.head_dim
            i = torch.arange(dh // 2, dtype=torch.float64)
            freqs = self.cfg.rope_base ** (-2.0 * i / dh)
            angles = torch.arange(T, dtype=torch.float64)[:, None] * freqs[None, :]
            self._rope_cache[T] = (angles.cos().to(self.device, self.dtype), angles.sin().to(self.device, self.dtype))
        return self._rope_cache[T]

    @staticmethod
    def _rope(x, cos, sin):
        # x: [B, heads, T, dh]; rotate-half convention.
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def _ln(self, x, scale):
        return F.layer_norm(x, (self.cfg.d_model,), weight=scale, bias=None,
                            eps=self.cfg.norm_eps)

    def logits(self, tokens):
        """Logits [B, T, V] for integer tokens [B, T]."""
        cfg, p = self.cfg, self.params
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        B, T = tokens.shape
        H, Hkv, dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        rep = H // Hkv
        cos, sin = self._rope_tables(T)

        x = F.embedding(tokens, p["embed"])  # [B, T, D], no scaling
        for i in range(cfg.n_layers):
            pre = f"layers.{i}."
            h = self._ln(x, p[pre + "norm.scale"])
            q = (h @ p[pre + "attn.wq"]).view(B, T, H, dh).transpose(1, 2)    # [B, H, T, dh]
            k = (h @ p[pre + "attn.wk"]).view(B, T, Hkv, dh).transpose(1, 2)  # [B, Hkv, T, dh]
            v = (h @ p[pre + "attn.wv"]).view(B, T, Hkv, dh).transpose(1, 2)
            q = self._rope(q, cos, sin)
            k = self._rope(k, cos, sin)
            if rep > 1:
                # query head j reads kv head j // rep
                k = k[:, :, None].expand(B, Hkv, rep, T, dh).reshape(B, H, T, dh)
                v = v[:, :, None].expand(B, Hkv, rep, T, dh).reshape(B, H, T, dh)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               scale=1.0 / math.sqrt(dh))
            a = a.transpose(1, 2).reshape(B, T, H * dh)
            attn = a @ p[pre + "attn.wo"]
            mlp = (F.silu(h @ p[pre + "mlp.w_gate"]) * (h @ p[pre + "mlp.w_up"])) \
                @ p[pre + "mlp.w_down"]
            x = x + attn + mlp  # parallel block
        z = self._ln(x, p["final_norm.scale"]) @ p["embed"].t()
        return z / math.sqrt(cfg.d_model)

    @torch.no_grad()
    def _forward_cached(self, tokens, start: int, cache):
        """Logits [B, V] of the last of tokens [B, t] at positions start..start+t-1; keys and
        values go into cache (per layer, preallocated [B, Hkv, capacity, dh] pairs)."""
        cfg, p = self.cfg, self.params
        B, T = tokens.shape
        H, Hkv, dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        cos, sin = self._rope_tables(cfg.max_seq_len)
        cos, sin = cos[start:start + T], sin[start:start + T]
        x = F.embedding(tokens, p["embed"])
        for i, (kc, vc) in enumerate(cache):
            pre = f"layers.{i}."
            h = self._ln(x, p[pre + "norm.scale"])
            q = self._rope((h @ p[pre + "attn.wq"]).view(B, T, H, dh).transpose(1, 2), cos, sin)
            kc[:, :, start:start + T] = self._rope((h @ p[pre + "attn.wk"]).view(B, T, Hkv, dh).transpose(1, 2),
                                                   cos, sin)
            vc[:, :, start:start + T] = (h @ p[pre + "attn.wv"]).view(B, T, Hkv, dh).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, kc[:, :, :start + T], vc[:, :, :start + T], is_causal=T > 1,
                                               scale=1.0 / math.sqrt(dh), enable_gqa=H != Hkv)
            attn = a.transpose(1, 2).reshape(B, T, H * dh) @ p[pre + "attn.wo"]
            mlp = (F.silu(h @ p[pre + "mlp.w_gate"]) * (h @ p[pre + "mlp.w_up"])) @ p[pre + "mlp.w_down"]
            x = x + attn + mlp
        z = self._ln(x[:, -1], p["final_norm.scale"]) @ p["embed"].t()
        return z / math.sqrt(cfg.d_model)

    @torch.no_grad()
    def greedy_decode(self, prompts, new_tokens: int):
        """Greedy decoding with a KV cache, as a PyTorch user would write it: prompts [B, P]
        (equal lengths) prefilled at once, then one token per step. Returns (new tokens
        [B, new_tokens] as numpy, prefill seconds, decode seconds)."""
        import time  # noqa: PLC0415

        cfg = self.cfg
        prompts = torch.as_tensor(np.asarray(prompts), dtype=torch.long)
        B, P = prompts.shape
        shape = (B, cfg.n_kv_heads, P + new_tokens, cfg.head_dim)
        cache = [(torch.empty(shape, dtype=self.dtype), torch.empty(shape, dtype=self.dtype))
                 for _ in range(cfg.n_layers)]
        t0 = time.perf_counter()
        token = self._forward_cached(prompts, 0, cache).argmax(-1)
        t1 = time.perf_counter()
        out = [token]
        for step in range(1, new_tokens):
            token = self._forward_cached(token[:, None], P + step - 1, cache).argmax(-1)
            out.append(token)
        t2 = time.perf_counter()
        return torch.stack(out, 1).numpy(), t1 - t0, t2 - t1

    @torch.no_grad()
    def decode_step_static(self, token, pos, cache):
        """One decode step on a static cache, shapes fixed (what torch.compile's CUDA graphs
        need, as gpt-fast does it): token [B] at position pos (a 0-d tensor); keys and values
        written at pos of cache (per layer [B, Hkv, capacity, dh] pairs), attention over the
        whole capacity with the positions past pos masked. Returns the logits [B, V]."""
        cfg, p = self.cfg, self.params
        B, H, Hkv, dh = token.shape[0], cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        capacity = cache[0][0].shape[2]
        cos, sin = self._rope_tables(cfg.max_seq_len)
        cos, sin = cos[pos][None], sin[pos][None]
        mask = (torch.arange(capacity, device=self.device) <= pos)[None, None, None, :]
        x = F.embedding(token[:, None], p["embed"])
        for i, (kc, vc) in enumerate(cache):
            pre = f"layers.{i}."
            h = self._ln(x, p[pre + "norm.scale"])
            q = self._rope((h @ p[pre + "attn.wq"]).view(B, 1, H, dh).transpose(1, 2), cos, sin)
            k = self._rope((h @ p[pre + "attn.wk"]).view(B, 1, Hkv, dh).transpose(1, 2), cos, sin)
            kc.index_copy_(2, pos[None], k)
            vc.index_copy_(2, pos[None], (h @ p[pre + "attn.wv"]).view(B, 1, Hkv, dh).transpose(1, 2))
            a = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=1.0 / math.sqrt(dh),
                                               enable_gqa=H != Hkv)
            attn = a.transpose(1, 2).reshape(B, 1, H * dh) @ p[pre + "attn.wo"]
            mlp = (F.silu(h @ p[pre + "mlp.w_gate"]) * (h @ p[pre + "mlp.w_up"])) @ p[pre + "mlp.w_down"]
            x = x + attn + mlp
        z = self._ln(x[:, -1], p["final_norm.scale"]) @ p["embed"].t()
        return z / math.sqrt(cfg.d_model)

    # -- public API -----------------------------------------------------------------------

    def loss(self, tokens, targets):
        """(loss, ce): loss = mean over targets >= 0 of (ce + z_loss·lse²); ce = its mean ce."""
        z = self.logits(tokens)
        y = torch.as_tensor(targets, dtype=torch.long, device=self.device)
        mask = y >= 0
        count = mask.sum()
        if int(count) == 0:
            raise ValueError("no counted targets (all < 0)")
        lse = torch.logsumexp(z, dim=-1)                                   # [B, T]
        z_y = z.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)       # [B, T]
        ce = lse - z_y
        m = mask.to(z.dtype)
        loss = ((ce + self.cfg.z_loss * lse * lse) * m).sum() / count
        ce_mean = (ce * m).sum() / count
        return loss, ce_mean

    def zero_grad(self):
        for t in self.params.values():
            t.grad = None

    def train_step(self, tokens, targets) -> float:
        """Zero the gradients, forward, backward; returns the loss."""
        self.zero_grad()
        loss, _ = self.loss(tokens, targets)
        loss.backward()
        return float(loss.detach())

    def grads(self) -> dict[str, np.ndarray]:
        out = {}
        for name, t in self.params.items():
            g = t.grad
            out[name] = (np.zeros(tuple(t.shape), dtype=t.detach().numpy().dtype) if g is None
                         else g.detach().cpu().numpy().copy())
        return out
