"""A float64 NumPy transcription of llama.cpp's ``command-r`` forward pass, reading a GGUF file
on its own with the gguf package's reader (hyperparameters from its keys as llama.cpp's loader
reads them, every tensor dequantized), with no palmcore code: the oracle that palmcore's GGUF
export is checked against in CI, where llama.cpp is not built. It follows llama.cpp's
src/models/command-r.cpp and the ggml operations it calls:

- ``build_norm(..., LLM_NORM)``: ``ggml_norm`` (``(x - mean) / sqrt(var + eps)``, eps from
  ``command-r.attention.layer_norm_epsilon``) times ``attn_norm.weight``, no bias;
- ``ggml_rope_ext`` in the "normal" mode (``rope_type`` NORM for command-r): pairs of
  neighbouring values ``(x[2i], x[2i+1])`` of each head rotated by ``pos · base^(-2i / n_rot)``,
  base ``command-r.rope.freq_base``, n_rot ``command-r.rope.dimension_count``;
- ``build_attn``: ``softmax(q k^T · kq_scale + causal mask) v`` with ``kq_scale`` 1/sqrt(head
  size), query head ``j`` reading key/value head ``j // (n_head / n_head_kv)``, then ``attn_output``;
- the parallel block: ``x + attn(h) + ffn_down(silu(ffn_gate(h)) * ffn_up(h))`` with ``h`` the
  one normed input;
- the head: ``output_norm``, then ``token_embd`` (``output`` duplicates it), times
  ``command-r.logit_scale``.

A ggml tensor {ne0, ne1} is the NumPy array [ne1, ne0], so ``y = x @ W.T`` for every weight.
"""

from __future__ import annotations

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

ARCH = "command-r"


def field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def read_tensors(reader: GGUFReader) -> dict[str, np.ndarray]:
    """{name: float64 array in NumPy order} of every tensor, dequantized."""
    return {t.name: dequantize(t.data, t.tensor_type).astype(np.float64).reshape(tuple(reversed(t.shape.tolist())))
            for t in reader.tensors}


def _norm(x, weight, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight


def _rope_normal(x, positions, n_rot, base):
    """ggml_rope, mode 0: x [..., T, heads, dh]; pair (2i, 2i+1) by positions · base^(-2i/n_rot)."""
    theta = positions[:, None] * base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)[None, :]
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    x0, x1 = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
    out = x.copy()
    out[..., 0:n_rot:2] = x0 * cos - x1 * sin
    out[..., 1:n_rot:2] = x0 * sin + x1 * cos
    return out


class CommandRNumpy:
    """``CommandRNumpy(path)(tokens)`` -> float64 logits [B, T, V] of the GGUF file at ``path``."""

    def __init__(self, path: str):
        r = GGUFReader(path)
        assert field(r, "general.architecture") == ARCH
        self.n_embd = field(r, f"{ARCH}.embedding_length")
        self.n_layer = field(r, f"{ARCH}.block_count")
        self.n_head = field(r, f"{ARCH}.attention.head_count")
        self.n_head_kv = field(r, f"{ARCH}.attention.head_count_kv")
        self.head = field(r, f"{ARCH}.attention.key_length")
        assert field(r, f"{ARCH}.attention.value_length") == self.head
        self.n_rot = field(r, f"{ARCH}.rope.dimension_count")
        self.base = field(r, f"{ARCH}.rope.freq_base")
        self.eps = field(r, f"{ARCH}.attention.layer_norm_epsilon")
        self.logit_scale = field(r, f"{ARCH}.logit_scale")
        self.w = read_tensors(r)
        assert "output.weight" not in self.w  # the head is token_embd (TENSOR_DUPLICATED)

    def __call__(self, tokens) -> np.ndarray:
        tokens = np.asarray(tokens)
        B, T = tokens.shape
        H, Hkv, dh, w = self.n_head, self.n_head_kv, self.head, self.w
        x = w["token_embd.weight"][tokens]
        positions = np.arange(T, dtype=np.float64)
        mask = np.triu(np.full((T, T), -np.inf), k=1)
        for i in range(self.n_layer):
            p = f"blk.{i}."
            h = _norm(x, w[p + "attn_norm.weight"], self.eps)
            q = _rope_normal((h @ w[p + "attn_q.weight"].T).reshape(B, T, H, dh), positions, self.n_rot, self.base)
            k = _rope_normal((h @ w[p + "attn_k.weight"].T).reshape(B, T, Hkv, dh), positions, self.n_rot, self.base)
            v = (h @ w[p + "attn_v.weight"].T).reshape(B, T, Hkv, dh)
            k, v = np.repeat(k, H // Hkv, axis=2), np.repeat(v, H // Hkv, axis=2)
            scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh) + mask
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            probs = scores / scores.sum(-1, keepdims=True)
            attn = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(B, T, H * dh) @ w[p + "attn_output.weight"].T
            gate = h @ w[p + "ffn_gate.weight"].T
            ffn = (gate / (1 + np.exp(-gate)) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
            x = x + attn + ffn
        x = _norm(x, w["output_norm.weight"], self.eps)
        return (x @ w["token_embd.weight"].T) * self.logit_scale
