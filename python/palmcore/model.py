"""PaLM: the Python face of one C++ model (PALM_SPEC.md)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from palmcore import _core
from palmcore.config import PaLMConfig
from palmcore.generation import Generation, KVCache, sampling_settings, stream_tokens, token_list, token_lists

_INT32 = np.iinfo(np.int32)


class PaLM:
    """A PaLM model whose parameters, activations and kernels live in the C++ runtime.

    Parameters are initialized as the spec says, deterministically in ``seed``. Gradients
    accumulate over calls of :meth:`forward_backward` until :meth:`zero_grad`.
    """

    def __init__(self, config: PaLMConfig, seed: int = 0):
        if not isinstance(config, PaLMConfig):
            raise TypeError(f"config must be a PaLMConfig, got {type(config).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        self._config = config
        self._model = _core.Model(config.to_dict(), int(seed))
        self._names = self._model.param_names()

    @property
    def config(self) -> PaLMConfig:
        return self._config

    def state_dict_names(self) -> list[str]:
        """The spec names of the parameters, in the spec's order."""
        return list(self._names)

    def num_params(self) -> int:
        return self._model.num_params()

    def state_dict(self) -> dict[str, np.ndarray]:
        """Every parameter by its spec name, as a float32 copy."""
        return {name: self._model.get_param(name) for name in self._names}

    def load_state_dict(self, state_dict: dict) -> None:
        """Replace every parameter. Strict: the same names, shapes and dtype (float32), all
        values finite; nothing is changed unless all of it is right."""
        missing = [n for n in self._names if n not in state_dict]
        known = set(self._names)
        unexpected = [n for n in state_dict if n not in known]
        if missing or unexpected:
            raise ValueError(f"state_dict does not match the model: missing {missing[:5]}"
                             f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                             f"{'...' if len(unexpected) > 5 else ''}")
        arrays = {}
        for name in self._names:
            value = state_dict[name]
            if not isinstance(value, np.ndarray) or value.dtype != np.float32:
                dtype = getattr(value, "dtype", type(value).__name__)
                raise TypeError(f"parameter '{name}' must be a float32 ndarray, got {dtype}")
            expected = tuple(self._model.param_shape(name))
            if value.shape != expected:
                raise ValueError(f"parameter '{name}' has shape {value.shape}, expected {expected}")
            if not np.isfinite(value).all():
                raise ValueError(f"parameter '{name}' holds a non-finite value (NaN or Inf)")
            arrays[name] = np.ascontiguousarray(value)
        for name, value in arrays.items():
            self._model.set_param(name, value)

    def forward(self, tokens) -> np.ndarray:
        """Logits float32 [B, T, V] for int tokens [B, T]."""
        return self._model.forward(_as_token_array(tokens, "tokens"))

    def forward_backward(self, tokens, targets) -> dict:
        """Loss of tokens [B, T] against targets [B, T] (targets < 0 are ignored); adds the
        gradient of the loss to :meth:`grads`. Returns {"loss", "ce", "tokens"}: the mean loss
        (with z-loss), the mean cross-entropy and the number of counted targets."""
        return self._model.forward_backward(_as_token_array(tokens, "tokens"),
                                            _as_token_array(targets, "targets"))

    def grads(self) -> dict[str, np.ndarray]:
        """The accumulated gradient of every parameter, by spec name (float32 copies)."""
        return {name: self._model.get_grad(name) for name in self._names}

    def zero_grad(self) -> None:
        self._model.zero_grad()

    def generate(self, prompts, max_new_tokens: int = 64, temperature: float = 0.8, top_k: int = 40,
                 top_p: float = 0.95, repetition_penalty: float = 1.0, stop_tokens=(1,),
                 seed: int = 0) -> list[list[int]]:
        """New tokens for each prompt (a list of token-id lists), decoded together over a
        key/value cache; a row ends after a stop token (which is emitted) or max_new_tokens.
        ``temperature=0`` is greedy. Sampling follows PALM_SPEC.md "Sampling": the draws of
        row i come from (seed, i, step), whatever the batch or thread count."""
        settings = sampling_settings(max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                     stop_tokens, seed)
        return Generation(self, token_lists(prompts), settings).run()

    def stream(self, prompt, max_new_tokens: int = 64, temperature: float = 0.8, top_k: int = 40,
               top_p: float = 0.95, repetition_penalty: float = 1.0, stop_tokens=(1,),
               seed: int = 0) -> Iterator[int]:
        """The new tokens of one prompt (a token-id list) as they are made; arguments as in
        :meth:`generate` (and checked here, before the first token)."""
        settings = sampling_settings(max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                     stop_tokens, seed)
        return stream_tokens(Generation(self, [token_list(prompt)], settings))

    def kv_cache(self, slots: int = 1, capacity: int | None = None) -> KVCache:
        """An empty key/value cache of ``slots`` sequences of up to ``capacity`` positions
        (default max_seq_len), for incremental forwards (:meth:`KVCache.feed`)."""
        return KVCache(self, slots, self._config.max_seq_len if capacity is None else capacity)


def _as_token_array(values, what: str) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype.kind not in "iu":
        raise TypeError(f"{what} must be an integer array, got dtype {array.dtype}")
    if array.ndim != 2:
        raise ValueError(f"{what} must be 2-D [batch, seq], got shape {array.shape}")
    if array.size and (array.max() > _INT32.max or array.min() < _INT32.min):
        raise ValueError(f"{what} holds ids outside the int32 range")
    return np.ascontiguousarray(array, dtype=np.int32)
