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


def load(path: str, device: str = "cpu", precision: str = "fp32", weights: str = "fp32"):
    """(model, tokenizer) from a run folder, its checkpoints folder or one checkpoint; the model
    on ``device`` ("cpu", "cuda", "cuda:N"), computing in ``precision`` ("fp32" or "bf16") with
    ``weights`` ("fp32", or compact decode weights "bf16" / "int8": PaLM.set_weights)."""
    for candidate in (path, os.path.join(path, "checkpoints")):
        if checkpoint.is_checkpoint(candidate) or checkpoint.latest(candidate):
            ck = checkpoint.load(candidate, with_optimizer=False, device=device, precision=precision, weights=weights)
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


def load_cached(path: str, device: str = "cpu", precision: str = "fp32", weights: str = "fp32"):
    """load(path, device, precision, weights), kept while the newest checkpoint under path stays
    the same."""
    key = os.path.realpath(path)
    if not os.path.exists(key):
        raise ValueError(f"no palmcore checkpoint at {path}: it does not exist")
    newest = checkpoint.latest(key) or checkpoint.latest(os.path.join(key, "checkpoints")) or key
    stamp = (newest, os.path.getmtime(newest), device, precision, weights)
    if _loaded.get(key, (None,))[0] != stamp:
        _loaded.clear()
        _loaded[key] = (stamp, load(key, device, precision, weights))
    return _loaded[key][1]


def prompt_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """The token ids a text prompt is fed as: end-of-document, then the text."""
    return [EOD_ID] + tokenizer.encode(text)


def generate(model_or_run, prompt, *, max_new_tokens: int = 80, temperature: float = 0.8, top_k: int = 40,
             top_p: float = 0.95, repetition_penalty: float = 1.0, stop=None, seed: int = 0, stream: bool = False,
             device: str = "cpu", precision: str = "fp32", weights: str = "fp32"):
    """Continue text with a trained model: a string in, a string out (a list for a list).

        palmcore.generate("runs/default", "def fibonacci(")               # a run folder
        palmcore.generate(result, ["Once upon", "In the"], temperature=0)  # palmcore.train's result
        for piece in palmcore.generate((model, tokenizer), "x = ", stream=True): print(piece, end="")

    ``model_or_run``: a run folder, its checkpoints folder or one checkpoint (loaded on ``device``
    in ``precision`` with ``weights``, and kept while its newest checkpoint stays the same), a palmcore.train
    result, or a ``(model, tokenizer)`` pair. Sampling follows PALM_SPEC "Sampling"
    (``temperature=0``: greedy; row i of a list draws from (seed, i, step)). A continuation ends
    at the end-of-document token, at ``max_new_tokens``, or at ``stop``: a string, a token id,
    or a list of them (the stop itself is not returned; strings are cut from the text).
    ``stream=True`` (one prompt) yields the text as it is made, in whole characters."""
    model, tokenizer = resolve_model(model_or_run, device, precision, weights)
    stop_strings, stop_tokens = _stops(stop)
    settings = sampling_settings(max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                 (EOD_ID, *stop_tokens), seed)
    single = isinstance(prompt, str)
    texts = [prompt] if single else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if texts is None or not all(isinstance(t, str) for t in texts):
        raise TypeError("prompt must be a string or a list of strings")
    if stream:
        if not single:
            raise TypeError("stream=True takes one prompt (a string)")
        return _stream(model, tokenizer, prompt, settings, stop_strings)
    outputs = model.generate([prompt_ids(tokenizer, t) for t in texts], **settings)
    ends = set(settings["stop_tokens"])
    decoded = [cut_at_stops(tokenizer.decode(out[:-1] if out and out[-1] in ends else out), stop_strings)
               for out in outputs]
    return decoded[0] if single else decoded


def resolve_model(model_or_run, device: str = "cpu", precision: str = "fp32", weights: str = "fp32"):
    """(model, tokenizer) from a run folder or checkpoint path, a palmcore.train result or a
    (model, tokenizer) pair."""
    from palmcore.model import PaLM  # noqa: PLC0415

    if isinstance(model_or_run, (str, os.PathLike)):
        return load_cached(os.fspath(model_or_run), device, precision, weights)
    pair = (model_or_run.model, model_or_run.tokenizer) if hasattr(model_or_run, "tokenizer") else model_or_run
    if (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], PaLM)
            and isinstance(pair[1], Tokenizer)):
        return pair[0], pair[1]
    raise TypeError("model must be a run folder or checkpoint path, a palmcore.train result or a "
                    f"(model, tokenizer) pair, got {type(model_or_run).__name__}")


def _stops(stop) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(stop strings, stop token ids) from None, one of them, or a list of them."""
    items = () if stop is None else tuple(stop) if isinstance(stop, (list, tuple)) else (stop,)
    strings = tuple(s for s in items if isinstance(s, str))
    tokens = tuple(t for t in items if isinstance(t, int) and not isinstance(t, bool))
    if len(strings) + len(tokens) != len(items) or any(s == "" for s in strings):
        raise TypeError(f"stop must be a non-empty string, a token id, or a list of them, got {stop!r}")
    return strings, tokens


def cut_at_stops(text: str, stops) -> str:
    """text up to the first of the stop strings."""
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[:min(ends)] if ends else text


def stream_text(model, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.8,
                top_k: int = 40, top_p: float = 0.95, repetition_penalty: float = 1.0,
                seed: int = 0) -> Iterator[str]:
    """The continuation of ``prompt`` as printable pieces, as they are made; a piece never
    ends inside a multi-byte character. Generation stops at the end-of-document token or
    when the model's max_seq_len is reached. Everything is checked before the first piece."""
    settings = sampling_settings(max_new_tokens, temperature, top_k, top_p, repetition_penalty, (EOD_ID,), seed)
    return _stream(model, tokenizer, prompt, settings, ())


def _stream(model, tokenizer: Tokenizer, prompt: str, settings: dict, stop_strings) -> Iterator[str]:
    ids = prompt_ids(tokenizer, prompt)
    room = model.config.max_seq_len - len(ids)
    if room < 1:
        raise ValueError(f"the prompt is {len(ids)} tokens; the model's max_seq_len is "
                         f"{model.config.max_seq_len}")
    tokens = model.stream(ids, **{**settings, "max_new_tokens": min(settings["max_new_tokens"], room)})
    return _until(_pieces(tokenizer, tokens, set(settings["stop_tokens"])), stop_strings)


def _until(pieces: Iterator[str], stops: tuple[str, ...]) -> Iterator[str]:
    """The pieces up to the first stop string (a tail as long as the longest stop is held back
    until it cannot begin one); closing the pieces' generator ends the generation."""
    if not stops:
        yield from pieces
        return
    hold = max(len(s) for s in stops) - 1
    text, shown = "", 0
    for piece in pieces:
        text += piece
        cut = cut_at_stops(text, stops)
        if len(cut) < len(text):
            if len(cut) > shown:
                yield cut[shown:]
            pieces.close()
            return
        if len(text) - hold > shown:
            yield text[shown:len(text) - hold]
            shown = len(text) - hold
    if len(text) > shown:
        yield text[shown:]


def _pieces(tokenizer: Tokenizer, tokens: Iterator[int], stops=frozenset((EOD_ID,))) -> Iterator[str]:
    new, shown = [], ""
    for token in tokens:
        if token in stops:
            break
        new.append(token)
        decoded = tokenizer.decode(new)
        if not decoded.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            yield decoded[len(shown):]
            shown = decoded
    rest = tokenizer.decode(new)[len(shown):]
    if rest:
        yield rest
