"""Generation from a PaLM: argument checks, the C++ decoder's Python face, text in and out.

The decoder (csrc/generator.cpp) prefills the prompts into a key/value cache and then makes one
token per step for every unfinished row; the sampler (csrc/sampler.cpp) follows PALM_SPEC.md
"Sampling". Python only checks arguments and hands tokens over.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterator, Sequence

import numpy as np

from palmcore import _core

EOS = 1  # the tokenizer's end-of-document id: the default stop token, and the prompt's left edge
_INT32_MAX = 2**31 - 1


def sampling_settings(max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop_tokens,
                      seed) -> dict:
    """The settings dict the C++ decoder reads, with types checked (ranges are checked there)."""
    def integer(name, value):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an integer, got {value!r}")
        return int(value)

    def real(name, value):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number, got {value!r}")
        return float(value)

    seed = integer("seed", seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    max_new_tokens = integer("max_new_tokens", max_new_tokens)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    top_k = integer("top_k", top_k)
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if stop_tokens is None:
        stop_tokens = ()
    if isinstance(stop_tokens, numbers.Integral):
        stop_tokens = (stop_tokens,)
    stop = [integer("a stop token", t) for t in stop_tokens]
    if any(not 0 <= t <= _INT32_MAX for t in stop):
        raise ValueError(f"stop tokens must be token ids >= 0, got {stop}")
    return {"max_new_tokens": max_new_tokens, "temperature": real("temperature", temperature),
            "top_k": top_k, "top_p": real("top_p", top_p),
            "repetition_penalty": real("repetition_penalty", repetition_penalty),
            "stop_tokens": stop, "seed": seed}


def token_lists(prompts) -> list[list[int]]:
    """A list of prompts, each a sequence of token ids, as lists of ints (ids are checked
    against the vocabulary in C++)."""
    if isinstance(prompts, np.ndarray):
        if prompts.ndim != 2:
            raise ValueError(f"prompts as an array must be 2-D [batch, seq], got shape {prompts.shape}")
        prompts = list(prompts)
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    if all(isinstance(p, numbers.Integral) for p in prompts):
        raise TypeError("prompts must be a list of token-id lists; wrap a single prompt in a list")
    return [token_list(p, f"prompt {i}") for i, p in enumerate(prompts)]


def token_list(prompt, name: str = "prompt") -> list[int]:
    array = np.asarray(prompt)
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise TypeError(f"{name} must be a sequence of integer token ids, got {prompt!r:.60}")
    if array.size == 0:
        raise ValueError(f"{name} is empty (give at least one token)")
    if array.min() < 0 or array.max() > _INT32_MAX:
        bad = int(array[(array < 0) | (array > _INT32_MAX)][0])
        raise ValueError(f"{name}: token id {bad} is outside the vocabulary")
    return [int(t) for t in array]


class Generation:
    """One generation in progress: call :meth:`step` until :attr:`done`."""

    def __init__(self, model, prompts: list[list[int]], settings: dict):
        self._generator = _core.Generator(model._model, prompts, settings)
        self.outputs: list[list[int]] = [[] for _ in prompts]

    @property
    def done(self) -> bool:
        return self._generator.done

    def step(self) -> list[tuple[int, int]]:
        """The (row, token) pairs made this step, in row order."""
        made = self._generator.step()
        for row, token in made:
            self.outputs[row].append(token)
        return made

    def run(self) -> list[list[int]]:
        while not self.done:
            self.step()
        return self.outputs


def stream_tokens(generation: Generation) -> Iterator[int]:
    while not generation.done:
        for _, token in generation.step():
            yield token


class KVCache:
    """A key/value cache over a model, for incremental forwards: ``feed`` runs tokens that
    continue the sequences of cache slots and returns the logits of each slot's last token."""

    def __init__(self, model, slots: int, capacity: int):
        self._cache = _core.KVCache(model._model, slots, capacity)

    @property
    def lengths(self) -> list[int]:
        """Positions each slot holds."""
        return self._cache.lengths

    @property
    def nbytes(self) -> int:
        """Bytes the cached keys and values take."""
        return self._cache.nbytes

    def feed(self, tokens, slots=0) -> np.ndarray:
        """Logits float32 [n, V] of the last token of each slot fed, in order; ``slots`` is one
        slot for every token, or one for all of them."""
        tokens = np.asarray(tokens)
        if tokens.dtype.kind not in "iu" or tokens.ndim != 1:
            raise TypeError(f"tokens must be a 1-D sequence of integer ids, got {tokens.dtype} {tokens.shape}")
        slots = np.broadcast_to(np.asarray(slots), tokens.shape)
        if slots.dtype.kind not in "iu":
            raise TypeError(f"slots must be integers, got {slots.dtype}")
        for name, values in (("token", tokens), ("slot", slots)):
            if values.size and (values.min() < -_INT32_MAX or values.max() > _INT32_MAX):
                raise ValueError(f"a {name} id is outside the int32 range")
        return self._cache.feed(np.ascontiguousarray(tokens, dtype=np.int32),
                                np.ascontiguousarray(slots, dtype=np.int32))


_loaded: dict = {}


def load_cached(path: str):
    """palmcore.load(path), kept while the newest checkpoint under path stays the same."""
    from palmcore.checkpoint import latest, load_pretrained  # noqa: PLC0415

    key = os.path.realpath(path)
    if not os.path.exists(key):
        raise ValueError(f"no palmcore checkpoint at {path}: it does not exist")
    newest = latest(key) or latest(os.path.join(key, "checkpoints")) or key
    stamp = (newest, os.path.getmtime(newest))
    if _loaded.get(key, (None,))[0] != stamp:
        _loaded.clear()
        _loaded[key] = (stamp, load_pretrained(key))
    return _loaded[key][1]


def generate_text(checkpoint: str, prompt, max_new_tokens: int = 80, temperature: float = 0.8,
                  top_k: int = 40, top_p: float = 0.95, repetition_penalty: float = 1.0,
                  stop_tokens=(EOS,), seed: int = 0):
    """The continuation of ``prompt`` (a string, or a list of strings) by the checkpoint at
    ``checkpoint`` (a run folder, its checkpoints folder or one checkpoint). Each prompt is
    encoded after an end-of-document token, as training saw every document; the stop token
    is left out of the text."""
    model, tokenizer = load_cached(checkpoint)
    single = isinstance(prompt, str)
    texts = [prompt] if single else list(prompt)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("prompt must be a string or a list of strings")
    outputs = model.generate([[EOS] + tokenizer.encode(t) for t in texts], max_new_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k, top_p=top_p,
                             repetition_penalty=repetition_penalty, stop_tokens=stop_tokens, seed=seed)
    stop = set(sampling_settings(0, 1.0, 0, 1.0, 1.0, stop_tokens, 0)["stop_tokens"])
    decoded = [tokenizer.decode(out[:-1] if out and out[-1] in stop else out) for out in outputs]
    return decoded[0] if single else decoded
