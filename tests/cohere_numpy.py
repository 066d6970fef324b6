"""A float64 NumPy transcription of transformers' ``CohereForCausalLM`` forward pass, reading a
Hugging Face directory (config.json, model.safetensors or its sharded index) on its own, with no
palmcore code: the oracle that palmcore's export is checked against where torch is not installed
(CI). It follows transformers' modeling_cohere.py step by step:

- CohereLayerNorm: ``(x - mean) * rsqrt(mean((x - mean)^2) + eps) * weight``, no bias;
- rotary: ``inv_freq = 1 / theta^(arange(0, dh, 2) / dh)``, ``freqs = position · inv_freq``,
  cos/sin of ``repeat_interleave(freqs, 2)`` (each frequency twice, side by side), and Cohere's
  ``rotate_half``, which pairs neighbouring columns: ``out[2j] = -x[2j+1]``, ``out[2j+1] = x[2j]``;
- attention: ``softmax(q k^T · head_dim^-0.5 + causal mask) v``, key/value head ``j // (H / Hkv)``
  for query head ``j`` (repeat_kv), then ``o_proj``;
- the decoder layer: one input LayerNorm feeds attention and the MLP, and
  ``x = x + attn + down(silu(gate(h)) * up(h))`` (the parallel block);
- the head: the final LayerNorm, then ``lm_head`` (the embedding when tie_word_embeddings) times
  ``logit_scale``.
"""

from __future__ import annotations

import json
import os

import numpy as np

_NUMPY = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """{name: float64 array} of one safetensors file (F32, F16, F64, BF16)."""
    with open(path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    data = raw[8 + n:]
    out = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        if entry["dtype"] == "BF16":
            bits = np.frombuffer(data[begin:end], dtype="<u2").astype(np.uint32) << 16
            array = bits.view(np.float32)
        else:
            array = np.frombuffer(data[begin:end], dtype=np.dtype(_NUMPY[entry["dtype"]]).newbyteorder("<"))
        out[name] = array.reshape(entry["shape"]).astype(np.float64)
    return out


def read_weights(directory: str) -> dict[str, np.ndarray]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if not os.path.exists(index):
        return read_safetensors(os.path.join(directory, "model.safetensors"))
    with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    out = {}
    for file in sorted(set(weight_map.values())):
        out.update(read_safetensors(os.path.join(directory, file)))
    assert set(out) == set(weight_map), "the index and the shards disagree"
    return out


def _layer_norm(x, weight, eps):
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + eps) * weight


def _rotate_half(x):
    x1, x2 = x[..., ::2], x[..., 1::2]
    return np.stack([-x2, x1], axis=-1).reshape(x.shape)


class CohereNumpy:
    """``CohereNumpy(directory)(tokens)`` -> float64 logits [B, T, V]."""

    def __init__(self, directory: str):
        with open(os.path.join(directory, "config.json")) as f:
            self.config = c = json.load(f)
        assert c["model_type"] == "cohere" and c["architectures"] == ["CohereForCausalLM"]
        assert not c.get("use_qk_norm") and not c.get("attention_bias") and c["hidden_act"] == "silu"
        self.w = read_weights(directory)
        self.D = c["hidden_size"]
        self.H = c["num_attention_heads"]
        self.Hkv = c["num_key_value_heads"]
        self.dh = c.get("head_dim") or self.D // self.H
        self.L = c["num_hidden_layers"]
        self.eps = c["layer_norm_eps"]
        rope = c.get("rope_parameters") or {}
        assert rope.get("rope_type", "default") == "default" and c.get("rope_scaling") is None
        self.theta = rope.get("rope_theta", c.get("rope_theta"))
        self.scale = c["logit_scale"]
        self.head = self.w["model.embed_tokens.weight"] if c["tie_word_embeddings"] else self.w["lm_head.weight"]

    def __call__(self, tokens) -> np.ndarray:
        tokens = np.asarray(tokens)
        B, T = tokens.shape
        D, H, Hkv, dh, w = self.D, self.H, self.Hkv, self.dh, self.w
        x = w["model.embed_tokens.weight"][tokens]
        inv_freq = 1.0 / (self.theta ** (np.arange(0, dh, 2, dtype=np.float64) / dh))
        freqs = np.arange(T, dtype=np.float64)[:, None] * inv_freq[None, :]
        emb = np.repeat(freqs, 2, axis=-1)  # torch.repeat_interleave(freqs, 2, dim=-1)
        cos, sin = np.cos(emb), np.sin(emb)
        mask = np.triu(np.full((T, T), -np.inf), k=1)
        for i in range(self.L):
            p = f"model.layers.{i}."
            h = _layer_norm(x, w[p + "input_layernorm.weight"], self.eps)
            q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(B, T, H, dh).transpose(0, 2, 1, 3)
            k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(B, T, Hkv, dh).transpose(0, 2, 1, 3)
            v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(B, T, Hkv, dh).transpose(0, 2, 1, 3)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            k, v = np.repeat(k, H // Hkv, axis=1), np.repeat(v, H // Hkv, axis=1)  # repeat_kv
            scores = q @ k.transpose(0, 1, 3, 2) * dh ** -0.5 + mask
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            probs = scores / scores.sum(-1, keepdims=True)
            attn = (probs @ v).transpose(0, 2, 1, 3).reshape(B, T, H * dh) @ w[p + "self_attn.o_proj.weight"].T
            gate = h @ w[p + "mlp.gate_proj.weight"].T
            mlp = (gate / (1 + np.exp(-gate)) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
            x = x + attn + mlp
        x = _layer_norm(x, w["model.norm.weight"], self.eps)
        return (x @ self.head.T) * self.scale

    def greedy(self, prompt: list[int], new_tokens: int, eos: int) -> list[int]:
        """transformers' greedy generate (do_sample=False): argmax of the last position's logits,
        fed back, stopping after ``eos``."""
        ids, out = list(prompt), []
        for _ in range(new_tokens):
            token = int(np.argmax(self([ids])[0, -1]))
            out.append(token)
            ids.append(token)
            if token == eos:
                break
        return out
