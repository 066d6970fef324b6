"""Token-level generation: argument checks and the Python face of the C++ decoder.

The decoder (csrc/generator.cpp) prefills the prompts into a key/value cache and then makes one
token per step for every unfinished row; the sampler (csrc/sampler.cpp) follows PALM_SPEC.md
"Sampling". Python only checks arguments and hands tokens over. Text in and text out live in
palmcore.text.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Sequence

import numpy as np

from palmcore import _core, checks


def sampling_settings(max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop_tokens,
                      seed) -> dict:
    """The settings dict the C++ decoder reads, every value checked (TypeError for a wrong
    kind, ValueError for a value out of range)."""
    if stop_tokens is None:
        stop_tokens = ()
    if isinstance(stop_tokens, numbers.Integral):
        stop_tokens = (stop_tokens,)
    return {"max_new_tokens": checks.integer("max_new_tokens", max_new_tokens, 0, checks.INT32_MAX),
            "temperature": checks.real("temperature", temperature, low=0.0),
            "top_k": checks.integer("top_k", top_k, 0, checks.INT32_MAX),
            "top_p": checks.real("top_p", top_p, 0.0, 1.0, low_open=True),
            "repetition_penalty": checks.real("repetition_penalty", repetition_penalty, 0.0, low_open=True),
            "stop_tokens": [checks.integer("a stop token", t, 0, checks.INT32_MAX) for t in stop_tokens],
            "seed": checks.integer("seed", seed, 0, 2**64 - 1)}


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
    if isinstance(prompt, (str, bytes)) or not isinstance(prompt, (Sequence, np.ndarray)):
        raise TypeError(f"{name} must be a sequence of integer token ids, got {prompt!r:.60}")
    if len(prompt) == 0:
        raise ValueError(f"{name} is empty (give at least one token)")
    ids = []
    for t in prompt:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise TypeError(f"{name} must be a sequence of integer token ids, got {prompt!r:.60}")
        if not 0 <= t <= checks.INT32_MAX:
            raise ValueError(f"{name}: token id {int(t)} is outside the vocabulary")
        ids.append(int(t))
    return ids


class Generation:
    """One generation in progress over a C++ model: call :meth:`step` until :attr:`done`."""

    def __init__(self, core_model, prompts: list[list[int]], settings: dict):
        self._generator = _core.Generator(core_model, prompts, settings)
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

    def tokens(self) -> Iterator[int]:
        """The new tokens as they are made (of a one-prompt generation)."""
        while not self.done:
            for _, token in self.step():
                yield token


class KVCache:
    """A key/value cache over a C++ model, for incremental forwards: ``feed`` runs tokens that
    continue the sequences of cache slots and returns the logits of each slot's last token."""

    def __init__(self, core_model, slots: int, capacity: int):
        self._cache = _core.KVCache(core_model, checks.integer("slots", slots, high=checks.INT32_MAX),
                                    checks.integer("capacity", capacity, high=checks.INT32_MAX))

    @property
    def lengths(self) -> list[int]:
        """Positions each slot holds."""
        return self._cache.lengths

    @property
    def nbytes(self) -> int:
        """Bytes the cached keys and values take."""
        return self._cache.nbytes

    def reset(self, slot: int) -> None:
        """Empty ``slot``: its next feed starts a new sequence at position 0."""
        self._cache.reset(checks.integer("slot", slot, 0, checks.INT32_MAX))

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
            if values.size and (values.min() < -checks.INT32_MAX or values.max() > checks.INT32_MAX):
                raise ValueError(f"a {name} id is outside the int32 range")
        return self._cache.feed(np.ascontiguousarray(tokens, dtype=np.int32),
                                np.ascontiguousarray(slots, dtype=np.int32))
