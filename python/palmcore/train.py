"""The training loop (PALM_SPEC.md, "Training recipe"): data, schedule, clipping, evaluation,
checkpoints, resume and the loss-spike guard, around the C++ model and optimizer.

    summary = palmcore.train.run(TrainSettings(corpus=["notes/"], out="runs/notes", steps=500))
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Callable

import numpy as np
from tqdm import tqdm

from palmcore import checkpoint, schedules
from palmcore.config import PaLMConfig
from palmcore.data import PackedDataset, TokenCache, find_files
from palmcore.model import PaLM
from palmcore.optim import Adafactor, AdamW
from palmcore.plot import write_loss_png
from palmcore.tokenizer import Tokenizer


@dataclasses.dataclass
class TrainSettings:
    corpus: list[str]
    out: str
    tokenizer: str | None = None      # a .model to reuse; default: train one into out/
    vocab_size: int = 10000           # for a tokenizer trained here
    preset: str = "seed"
    overrides: dict = dataclasses.field(default_factory=dict)
    batch_size: int = 8
    accumulate: int = 1               # micro-batches per step (batch_size rows split evenly)
    seq_len: int = 256
    steps: int = 1000
    time_budget: float | None = None  # seconds; stops early (with a checkpoint) when spent
    optimizer: str = "adafactor"      # or "adamw"
    lr: float | None = None           # peak rate; default 1e-2 (adafactor) or 3e-4 (adamw)
    schedule: str = "palm"            # or "cosine"
    warmup_steps: int = 100           # cosine only
    max_grad_norm: float = 1.0
    eval_every: int = 100
    eval_batches: int = 4
    checkpoint_every: int = 100
    keep: int = 3
    seed: int = 0
    spike_factor: float = 3.0         # a loss above this × its running average is a spike
    spike_warmup: int = 20            # steps before the running average is trusted
    progress: bool = True             # a tqdm progress bar on stderr
    sample_tokens: int = 40           # greedy continuation of a held-out prompt at the end


def run(s: TrainSettings, resume: bool = False, log: Callable[[str], None] = tqdm.write) -> dict:
    """Train as ``s`` says, writing checkpoints and metrics.jsonl under ``s.out``; with
    ``resume``, continue from the newest checkpoint there. Returns the last metrics."""
    if not 1 <= s.accumulate <= s.batch_size or s.batch_size % s.accumulate:
        raise ValueError(f"accumulate ({s.accumulate}) must divide batch_size ({s.batch_size})")
    os.makedirs(s.out, exist_ok=True)
    tokenizer = _tokenizer(s, log)
    cache = TokenCache.build(s.corpus, tokenizer, os.path.join(s.out, "data"))
    train_data = PackedDataset(cache, s.seq_len, "train", seed=s.seed)
    val_data = PackedDataset(cache, s.seq_len, "val", seed=s.seed)
    ckpt_dir = os.path.join(s.out, "checkpoints")
    config = PaLMConfig.preset(s.preset, **{**s.overrides, "vocab_size": tokenizer.vocab_size,
                                            "max_seq_len": max(s.seq_len, s.overrides.get("max_seq_len", 0))})
    if s.schedule not in ("palm", "cosine"):
        raise ValueError(f"schedule must be 'palm' or 'cosine', got {s.schedule!r}")
    default_lr = 1e-2 if s.optimizer == "adafactor" else 3e-4
    lr_at = (schedules.palm(s.lr or default_lr) if s.schedule == "palm" else
             schedules.cosine(s.lr or default_lr, s.warmup_steps, max(s.steps, s.warmup_steps + 1)))

    latest = checkpoint.latest(ckpt_dir) if resume else None
    if latest:
        ck = checkpoint.load(latest, config=config)
        model, state = ck.model, ck.trainer
        for key in ("seed", "batch_size", "seq_len", "optimizer", "schedule"):
            if key in state.get("settings", {}) and state["settings"][key] != getattr(s, key):
                raise ValueError(f"cannot resume {latest} with {key}={getattr(s, key)!r}: it was "
                                 f"trained with {key}={state['settings'][key]!r}")
        opt = _optimizer(s, model)
        opt.load_state_dict(ck.optimizer_state)
        log(f"resumed from {latest} (step {state['step']})")
    else:
        model = PaLM(config, seed=s.seed)
        opt = _optimizer(s, model)
        state = {"step": 0, "data_step": 0, "loss_avg": None, "skipped": [],
                 "settings": {k: getattr(s, k) for k in ("seed", "batch_size", "seq_len", "optimizer",
                                                          "schedule", "lr", "max_grad_norm")}}
        checkpoint.save(ckpt_dir, model, opt, state, step=0, keep=s.keep,  # a rollback target
                        tokenizer_path=tokenizer.model_path)

    metrics_path = os.path.join(s.out, "metrics.jsonl")
    start = time.perf_counter()
    last: dict = {}
    # With a time budget the bar counts seconds (its ETA is then the budget's end), else steps.
    by_time = s.time_budget is not None
    bar = tqdm(total=round(s.time_budget) if by_time else s.steps, initial=0 if by_time else state["step"],
               unit="s" if by_time else "step", disable=not s.progress, dynamic_ncols=True)
    try:
        while state["step"] < s.steps:
            if s.time_budget is not None and time.perf_counter() - start > s.time_budget:
                log(f"time budget of {s.time_budget:.0f} s spent at step {state['step']}")
                break
            tokens = train_data.batch(state["data_step"], s.batch_size)
            t0 = time.perf_counter()
            model.zero_grad()
            out = _accumulate(model, tokens, s.accumulate)
            step = state["step"] + 1
            lr = lr_at(step)
            spike = _spike(out["loss"], state["loss_avg"], step, s)
            grad_norm = math.nan
            if not spike:
                try:
                    grad_norm = opt.step(lr, s.max_grad_norm, grad_scale=1.0 / s.accumulate)
                except RuntimeError:  # a non-finite gradient norm: nothing was changed
                    spike = "non-finite gradient norm"
            if spike:
                model, opt, state = _roll_back(ckpt_dir, config, s, state, spike, log)
                continue
            elapsed = time.perf_counter() - t0
            avg = state["loss_avg"]
            state.update(step=step, data_step=state["data_step"] + 1,
                         loss_avg=out["loss"] if avg is None else 0.95 * avg + 0.05 * out["loss"])
            state = _skip_forward(state)
            last = {"step": step, "loss": out["loss"], "ce": out["ce"], "lr": lr, "grad_norm": grad_norm,
                    "tokens_per_s": out["tokens"] / elapsed}
            if step % s.eval_every == 0 or step == s.steps:
                last.update(_evaluate(model, val_data, tokenizer, s))
                log(f"step {step}: loss {out['loss']:.4f} val_loss {last['val_loss']:.4f} "
                    f"val_bpb {last['val_bpb']:.3f} lr {lr:.2e} {last['tokens_per_s']:,.0f} tok/s")
            with open(metrics_path, "a") as f:
                f.write(json.dumps(last) + "\n")
            if "val_loss" in last:
                write_loss_png(metrics_path, os.path.join(s.out, "loss.png"))
            bar.update(min(bar.total, round(time.perf_counter() - start)) - bar.n if by_time else 1)
            bar.set_postfix(step=step, loss=f"{out['loss']:.3f}", tok_s=f"{last['tokens_per_s']:,.0f}")
            if step % s.checkpoint_every == 0:
                checkpoint.save(ckpt_dir, model, opt, state, step=step, keep=s.keep,
                                tokenizer_path=tokenizer.model_path)
    except KeyboardInterrupt:
        log(f"interrupted at step {state['step']}: saving a checkpoint")
    finally:
        bar.close()
    if last and "val_loss" not in last:  # stopped between evaluations: evaluate once more
        last.update(_evaluate(model, val_data, tokenizer, s))
        log(f"step {last['step']}: val_loss {last['val_loss']:.4f} val_bpb {last['val_bpb']:.3f} (final)")
        with open(metrics_path) as f:
            lines = f.readlines()
        lines[-1] = json.dumps(last) + "\n"  # the last step's line, now with its evaluation
        with open(metrics_path + ".tmp", "w") as f:
            f.writelines(lines)
        os.replace(metrics_path + ".tmp", metrics_path)
        write_loss_png(metrics_path, os.path.join(s.out, "loss.png"))
    checkpoint.save(ckpt_dir, model, opt, state, step=state["step"], keep=s.keep,
                    tokenizer_path=tokenizer.model_path)
    if s.sample_tokens:
        prompt, sample = _greedy_sample(model, tokenizer, val_data, s.sample_tokens)
        log(f"sample (greedy, after a held-out prompt):\n{prompt}\033[1m{sample}\033[0m")
        last = dict(last, sample_prompt=prompt, sample=sample)
    return last


def _accumulate(model: PaLM, tokens: np.ndarray, micro_batches: int) -> dict:
    """forward_backward over ``micro_batches`` equal slices of the batch's rows; gradients add
    up (the optimizer scales them by 1/micro_batches), losses are averaged. Packed windows
    count the same number of targets per row, so this equals one big batch."""
    outs = [model.forward_backward(part[:, :-1], part[:, 1:])
            for part in np.array_split(tokens, micro_batches)]
    return {"loss": float(np.mean([o["loss"] for o in outs])), "ce": float(np.mean([o["ce"] for o in outs])),
            "tokens": sum(o["tokens"] for o in outs)}


def _tokenizer(s: TrainSettings, log) -> Tokenizer:
    path = s.tokenizer or os.path.join(s.out, "tokenizer.model")
    if os.path.exists(path):
        return Tokenizer(path)
    if s.tokenizer:
        raise ValueError(f"no tokenizer model at {s.tokenizer}")
    files = find_files(s.corpus)
    log(f"training a {s.vocab_size}-token tokenizer on {len(files)} files")
    texts = (open(f, encoding="utf-8", errors="replace").read() for f in files)
    return Tokenizer.train(texts, s.vocab_size, path)


def _optimizer(s: TrainSettings, model: PaLM):
    if s.optimizer == "adafactor":
        return Adafactor(model)
    if s.optimizer == "adamw":
        return AdamW(model)
    raise ValueError(f"optimizer must be 'adafactor' or 'adamw', got {s.optimizer!r}")


def _spike(loss: float, avg: float | None, step: int, s: TrainSettings) -> str | None:
    if not math.isfinite(loss):
        return f"loss {loss}"
    if avg is not None and step > s.spike_warmup and loss > s.spike_factor * avg:
        return f"loss {loss:.4f} > {s.spike_factor} x running average {avg:.4f}"
    return None


def _roll_back(ckpt_dir, config, s: TrainSettings, state: dict, why: str, log):
    """Back to the newest checkpoint, skipping the batch that spiked (and everything the
    rolled-back steps had consumed is replayed, except that batch)."""
    bad = state["data_step"]
    ck = checkpoint.load(checkpoint.latest(ckpt_dir), config=config)
    opt = _optimizer(s, ck.model)
    opt.load_state_dict(ck.optimizer_state)
    restored = dict(ck.trainer)
    restored["skipped"] = sorted(set(restored.get("skipped", [])) | set(state.get("skipped", [])) | {bad})
    log(f"loss spike at step {state['step'] + 1} ({why}): rolled back to step {restored['step']}, "
        f"skipping data batch {bad}")
    # replay from the checkpoint's data position, stepping over every skipped batch
    return ck.model, opt, _skip_forward(restored)


def _skip_forward(state: dict) -> dict:
    while state["data_step"] in state["skipped"]:
        state["data_step"] += 1
    return state


def _greedy_sample(model: PaLM, tokenizer: Tokenizer, data: PackedDataset, n: int) -> tuple[str, str]:
    """A greedy continuation of the first half of the first held-out window."""
    ids = [int(t) for t in data.window(0)[: max(1, data.seq_len // 2)]]
    new = model.generate([ids], max_new_tokens=min(n, model.config.max_seq_len - len(ids)), temperature=0,
                         stop_tokens=())[0]
    return tokenizer.decode(ids), tokenizer.decode(new)


def _evaluate(model: PaLM, data: PackedDataset, tokenizer: Tokenizer, s: TrainSettings) -> dict:
    """Validation loss, perplexity and bits per byte over the first eval_batches batches."""
    nats, tokens, nbytes, losses = 0.0, 0, 0, []
    for k in range(s.eval_batches):
        batch = data.batch(k, s.batch_size)
        out = model.forward_backward(batch[:, :-1], batch[:, 1:])
        losses.append(out["loss"])
        nats += out["ce"] * out["tokens"]
        tokens += out["tokens"]
        nbytes += sum(len(tokenizer.decode(row).encode()) for row in batch[:, 1:])
    model.zero_grad()
    return {"val_loss": float(np.mean(losses)), "val_ppl": math.exp(nats / tokens),
            "val_bpb": nats / math.log(2) / max(nbytes, 1)}
