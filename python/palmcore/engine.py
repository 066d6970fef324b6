"""Continuous batching: one thread owns a model and a key/value cache of a fixed number of slots.

Each loop iteration admits waiting sequences into free slots (prefill: their prompts fed in
chunks, several slots per call), then makes one token for every active sequence with one
``KVCache.feed`` call. Every row is sampled by the C++ sampler keyed by the sequence's own
(seed, row, step), so a sequence's tokens do not depend on what else runs: sequence ``row`` of
a request equals row ``row`` of ``model.generate([prompt] * n, seed=seed, ...)``.

Callers (the HTTP handlers) :meth:`Engine.submit` sequences and :meth:`Engine.cancel` them;
tokens come back through each sequence's ``emit`` callback, called on the engine thread.

A fault in the model (the memory guard refusing a prefill, NaN logits) fails the sequences whose
model call or logits row it is, with their error; every other sequence runs on. Any other error
in a step (a bug) fails every sequence in a slot, and the engine serves on.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from palmcore import _core

# Prompt tokens per prefill feed: bounds the activations' memory, as the Generator's chunks do.
PREFILL_ROWS = 2048


def on_passing_thread(f, *args):
    """f(*args) on a thread that ends before this returns. OpenMP keeps a thread pool for every
    thread that ran a parallel region; while two pools live, libgomp counts more threads than
    cores and stops spinning between regions, which doubled a decode step (2.2 -> 4.5 ms for 16
    rows of the seed preset on 2 cores). Model work before the engine starts (loading, a
    baseline) runs here, so the engine's thread holds the only pool."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(f, *args).result()


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is full."""


class Closed(Exception):
    """The engine is closing (the server shuts down): it takes no more sequences."""


@dataclass(eq=False)
class Sequence:
    """One choice of one request: a prompt continued in one cache slot."""
    prompt: list[int]
    max_tokens: int
    sampling: dict               # temperature, top_k, top_p, repetition_penalty, seed
    stop_tokens: frozenset
    row: int                     # the sampler's row: the choice's index in its request
    emit: Callable[[str, object], None]  # ("token", (id, logprobs row or None)) / ("done", reason) / ("error", msg)
    logprobs: bool = False
    tokens: list[int] = field(default_factory=list)
    seen: list[int] = field(default_factory=list)  # distinct prompt + output tokens (penalty only)
    slot: int = -1
    fed: int = 0                 # prompt tokens already in the cache
    stopped: str | None = None   # why the handler stopped it: "stop" (a stop string) or "cancelled"
    submitted: float = 0.0


class Metrics:
    """Counters the engine keeps for /metrics (written on the engine thread, read anywhere)."""

    # stop: an end token or a stop string; length: max_tokens; cancelled: the client went away (or
    # its request failed); error: a model fault; rejected: refused by a full queue (429)
    OUTCOMES = ("stop", "length", "cancelled", "error", "rejected")
    TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self):
        self.sequences = collections.Counter()  # by outcome: see OUTCOMES
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.ttft_buckets = [0] * len(self.TTFT_BUCKETS)
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.recent = collections.deque()       # (time, tokens) of recent decode steps

    def first_token(self, seconds: float) -> None:
        self.ttft_sum += seconds
        self.ttft_count += 1
        for i, edge in enumerate(self.TTFT_BUCKETS):
            if seconds <= edge:
                self.ttft_buckets[i] += 1

    def tokens_made(self, n: int, window: float = 10.0) -> None:
        now = time.monotonic()
        self.generated_tokens += n
        self.recent.append((now, n))
        while self.recent and self.recent[0][0] < now - window:
            self.recent.popleft()

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self.recent) if t >= now - window]
        return sum(n for _, n in recent) / window


class Engine:
    def __init__(self, model, slots: int, queue: int):
        self.model = model
        self.slots = slots
        self.queue_limit = queue
        self.cache = model.kv_cache(slots)
        self.metrics = Metrics()
        self._cond = threading.Condition()
        self._pending: collections.deque[Sequence] = collections.deque()
        self._active: list[Sequence] = []
        self._free = list(range(slots - 1, -1, -1))
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="palmcore-engine", daemon=True)
        self._thread.start()

    # --- the handlers' side ---------------------------------------------------------------
    def submit(self, sequences: list[Sequence]) -> None:
        """Queue a request's sequences together, or raise QueueFull or Closed (nothing queued)."""
        with self._cond:
            if self._stopping:
                raise Closed("the server is shutting down")
            if len(self._active) + len(self._pending) + len(sequences) > self.slots + self.queue_limit:
                self.metrics.sequences["rejected"] += len(sequences)
                raise QueueFull(f"all {self.slots} slots are busy and the queue of {self.queue_limit} is full")
            now = time.monotonic()
            for s in sequences:
                s.submitted = now
            self._pending.extend(sequences)
            self._cond.notify()

    def cancel(self, sequences: list[Sequence], outcome: str = "cancelled") -> None:
        """Stop sequences ("cancelled": a disconnect; "stop": a stop string): their slots are freed
        at the next step. A sequence already ended keeps its outcome."""
        with self._cond:
            for s in sequences:
                s.stopped = s.stopped or outcome
            self._cond.notify()

    @property
    def queue_length(self) -> int:
        return len(self._pending)

    @property
    def busy_slots(self) -> int:
        return len(self._active)

    def close(self) -> None:
        """End the engine thread, cancelling the sequences still queued or running. The server
        closes its engine after its graceful shutdown, when no handler waits for them any more
        (a handler cut off by the shutdown timeout may not have cancelled its own yet)."""
        with self._cond:
            self._stopping = True
            for s in [*self._pending, *self._active]:
                s.stopped = s.stopped or "cancelled"
            self._cond.notify()
        self._thread.join()

    # --- the engine thread -----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            try:
                if not self._step():
                    return
            except Exception as e:  # not a model fault (those fail their own sequences): where it
                # struck is unknown, so every sequence in a slot fails; the waiting ones run next
                self._fail(list(self._active), RuntimeError(f"internal error in the engine: {type(e).__name__}: {e}"))

    def _step(self) -> bool:
        """Admit waiting sequences, prefill them, decode one token for the others; False when
        the engine is closed and nothing is left."""
        with self._cond:
            self._drop_cancelled()
            while not self._active and not self._pending:
                if self._stopping:
                    return False
                self._cond.wait()
                self._drop_cancelled()
            admitted = []
            while self._free and self._pending:
                s = self._pending.popleft()
                s.slot = self._free.pop()
                self._active.append(s)
                admitted.append(s)
        self._prefill(admitted)
        self._decode([s for s in self._active if s.tokens and s not in admitted])
        return True

    def _drop_cancelled(self) -> None:
        for s in [s for s in self._active if s.stopped]:
            self._release(s, s.stopped)
        if any(s.stopped for s in self._pending):
            for s in [s for s in self._pending if s.stopped]:
                self._pending.remove(s)
                self.metrics.sequences[s.stopped] += 1

    def _release(self, s: Sequence, outcome: str) -> None:
        self._active.remove(s)
        self._free.append(s.slot)
        self.metrics.sequences[outcome] += 1

    def _fail(self, sequences: list[Sequence], error: Exception) -> None:
        """A model fault that belongs to these sequences: each gets the error and leaves its slot."""
        with self._cond:
            for s in sequences:
                if s in self._active:
                    s.emit("error", str(error))
                    self._release(s, "error")

    def _prefill(self, admitted: list[Sequence]) -> None:
        todo = [s for s in admitted if not s.stopped]
        for s in todo:
            self.metrics.prompt_tokens += len(s.prompt)
            if s.sampling["repetition_penalty"] != 1.0:
                s.seen = sorted(set(s.prompt))
        self._feed_prompts(todo)

    def _feed_prompts(self, todo: list[Sequence]) -> None:
        """The prompts into their (fresh) slots, several a call. A call that fails is retried one
        prompt at a time, so that a fault fails only the prompt it belongs to."""
        for s in todo:
            self.cache.reset(s.slot)
            s.fed = 0
        while todo:
            tokens, slots, ends = [], [], []
            for s in todo:
                take = min(len(s.prompt) - s.fed, PREFILL_ROWS - len(tokens))
                if take <= 0:
                    break
                tokens += s.prompt[s.fed:s.fed + take]
                slots += [s.slot] * take
                s.fed += take
                ends.append(s)
            try:
                logits = self.cache.feed(np.array(tokens, np.int32), np.array(slots, np.int32))
            except Exception as e:  # a model fault fails its requests, not the server
                if len(ends) == 1:
                    self._fail(ends, e)
                else:
                    for s in ends:
                        self._feed_prompts([s])
                todo = [s for s in todo if s not in ends]
                continue
            # one logits row per slot fed, in order; a prompt cut by the chunk samples after its last chunk
            whole = [i for i, s in enumerate(ends) if s.fed == len(s.prompt)]
            self._sample([ends[i] for i in whole], logits[whole])
            todo = [s for s in todo if s.fed < len(s.prompt)]

    def _decode(self, running: list[Sequence]) -> None:
        running = [s for s in running if not s.stopped]
        if not running:
            return
        try:
            logits = self.cache.feed(np.array([s.tokens[-1] for s in running], np.int32),
                                     np.array([s.slot for s in running], np.int32))
        except Exception as e:  # the step of every running sequence failed
            self._fail(running, e)
            return
        self._sample(running, logits)

    def _sample(self, sequences: list[Sequence], logits: np.ndarray) -> None:
        """Each sequence's next token from its logits row: one C++ call for all rows."""
        if not sequences:
            return
        chosen = _core.sample_rows(logits, [s.row for s in sequences], [len(s.tokens) for s in sequences],
                                   [s.seen for s in sequences], [s.sampling for s in sequences])
        now = time.monotonic()
        self.metrics.tokens_made(int((chosen >= 0).sum()))
        for s, token, row in zip(sequences, chosen.tolist(), logits):
            if token < 0:  # this row's logits hold NaN
                self._fail([s], RuntimeError(f"the logits hold NaN (at token {-1 - token})"))
                continue
            if not s.tokens:
                self.metrics.first_token(now - s.submitted)
            s.tokens.append(token)
            if s.seen and token not in s.seen:
                s.seen.append(token)
            s.emit("token", (token, _log_softmax(row) if s.logprobs else None))
            if token in s.stop_tokens or len(s.tokens) >= s.max_tokens:
                reason = "stop" if token in s.stop_tokens else "length"
                s.emit("done", reason)
                with self._cond:
                    self._release(s, reason)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    return z - (z.max() + np.log(np.exp(z - z.max()).sum()))
