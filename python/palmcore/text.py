"""Text in, text out: a trained run's model and tokenizer, and generation over strings.

    model, tokenizer = palmcore.load("runs/default")
    text = palmcore.generate("runs/default", "def fibonacci(", max_new_tokens=80)
    for piece in stream_text(model, tokenizer, "def fibonacci(", max_new_tokens=80): ...

Prompts are encoded after an end-of-document token, as training saw every document start; the
stop token is left out of the text. Token-level decoding is palmcore.generation's.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from palmcore import checkpoint
from palmcore.generation import sampling_settings
from palmcore.tokenizer import EOD_ID, Tokenizer


def load(path: str, device: str = "cpu", precision: str = "fp32"):
    """(model, tokenizer) from a run folder, its checkpoints folder or one checkpoint; the model
    on ``device`` ("cpu", "cuda", "cuda:N"), computing in ``precision`` ("fp32" or "bf16")."""
    for candidate in (path, os.path.join(path, "checkpoints")):
        if checkpoint.is_checkpoint(candidate) or checkpoint.latest(candidate):
            ck = checkpoint.load(candidate, with_optimizer=False, device=device, precision=precision)
            tok_path = os.path.join(ck.path, "tokenizer.model")
            if not os.path.exists(tok_path):
                raise ValueError(f"checkpoint {ck.path} holds no tokenizer.model")
            tokenizer = Tokenizer(tok_path)
            if tokenizer.vocab_size != ck.model.config.vocab_size:
                raise ValueError(f"checkpoint {ck.path}: its tokenizer has {tokenizer.vocab_size} tokens but "
                                 f"the model's vocab_size is {ck.model.config.vocab_size}")
            return ck.model, tokenizer
    if not os.path.exists(path):
        raise ValueError(f"no palmcore checkpoint at {path}: it does not exist")
    raise ValueError(f"no palmcore checkpoint in {path}")


_loaded: dict = {}


def load_cached(path: str, device: str = "cpu", precision: str = "fp32"):
    """load(path, device, precision), kept while the newest checkpoint under path stays the same."""
    key = os.path.realpath(path)
    if not os.path.exists(key):
        raise ValueError(f"no palmcore checkpoint at {path}: it does not exist")
    newest = checkpoint.latest(key) or checkpoint.latest(os.path.join(key, "checkpoints")) or key
    stamp = (newest, os.path.getmtime(newest), device, precision)
    if _loaded.get(key, (None,))[0] != stamp:
        _loaded.clear()
        _loaded[key] = (stamp, load(key, device, precision))
    return _loaded[key][1]


def prompt_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """The token ids a text prompt is fed as: end-of-document, then the text."""
    return [EOD_ID] + tokenizer.encode(text)


def generate(checkpoint_path: str, prompt, max_new_tokens: int = 80, temperature: float = 0.8,
             top_k: int = 40, top_p: float = 0.95, repetition_penalty: float = 1.0,
             stop_tokens=(EOD_ID,), seed: int = 0, device: str = "cpu", precision: str = "fp32"):
    """The continuation of ``prompt`` (a string, or a list of strings) by the checkpoint at
    ``checkpoint_path`` (a run folder, its checkpoints folder or one checkpoint), run on
    ``device`` in ``precision``."""
    settings = sampling_settings(max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                 stop_tokens, seed)
    single = isinstance(prompt, str)
    texts = [prompt] if single else list(prompt)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("prompt must be a string or a list of strings")
    model, tokenizer = load_cached(checkpoint_path, device, precision)
    outputs = model.generate([prompt_ids(tokenizer, t) for t in texts], **settings)
    stop = set(settings["stop_tokens"])
    decoded = [tokenizer.decode(out[:-1] if out and out[-1] in stop else out) for out in outputs]
    return decoded[0] if single else decoded


def stream_text(model, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.8,
                top_k: int = 40, top_p: float = 0.95, repetition_penalty: float = 1.0,
                seed: int = 0) -> Iterator[str]:
    """The continuation of ``prompt`` as printable pieces, as they are made; a piece never
    ends inside a multi-byte character. Generation stops at the end-of-document token or
    when the model's max_seq_len is reached. Everything is checked before the first piece."""
    ids = prompt_ids(tokenizer, prompt)
    room = model.config.max_seq_len - len(ids)
    if room < 1:
        raise ValueError(f"the prompt is {len(ids)} tokens; the model's max_seq_len is "
                         f"{model.config.max_seq_len}")
    tokens = model.stream(ids, max_new_tokens=min(max_new_tokens, room), temperature=temperature,
                          top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                          stop_tokens=(EOD_ID,), seed=seed)
    return _pieces(tokenizer, tokens)


def _pieces(tokenizer: Tokenizer, tokens: Iterator[int]) -> Iterator[str]:
    new, shown = [], ""
    for token in tokens:
        if token == EOD_ID:
            break
        new.append(token)
        decoded = tokenizer.decode(new)
        if not decoded.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            yield decoded[len(shown):]
            shown = decoded
    rest = tokenizer.decode(new)[len(shown):]
    if rest:
        yield rest
