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
from palmcore.distributed import Mesh, _launched_by_mpi
from palmcore.model import PaLM
from palmcore.optim import Adafactor, AdamW
from palmcore.plan import MeshShape
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
    mesh: str = "data=1,model=1"      # data x model ranks (launch with mpiexec -n data·model)


def run(s: TrainSettings, resume: bool = False, log: Callable[[str], None] = tqdm.write) -> dict:
    """Train as ``s`` says, writing checkpoints and metrics.jsonl under ``s.out``; with
    ``resume``, continue from the newest checkpoint there (whatever mesh wrote it). Returns the
    last metrics (on the main rank; {} on the others).

    On a mesh of data x model ranks every rank runs this: data rank d takes its share of each
    batch's rows, the model ranks split the parameters; the main rank alone logs and writes."""
    shape = MeshShape.parse(s.mesh)
    if not 1 <= s.accumulate <= s.batch_size or s.batch_size % (s.accumulate * shape.data):
        raise ValueError(f"accumulate ({s.accumulate}) x the data axis ({shape.data}) must divide "
                         f"batch_size ({s.batch_size})")
    mesh = Mesh(shape.data, shape.model) if shape.size > 1 or _launched_by_mpi() else None
    main = mesh is None or mesh.is_main
    if not main:
        log = _silent
        s = dataclasses.replace(s, progress=False)
    os.makedirs(s.out, exist_ok=True)
    # the main rank trains the tokenizer and builds the token cache; the others then read them
    tokenizer = _main_first(mesh, lambda: _tokenizer(s, log))
    cache = _main_first(mesh, lambda: TokenCache.build(s.corpus, tokenizer, os.path.join(s.out, "data")))
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
        ck = checkpoint.load(latest, config=config, mesh=mesh)
        model, state = ck.model, ck.trainer
        for key in ("seed", "batch_size", "seq_len", "optimizer", "schedule"):
            if key in state.get("settings", {}) and state["settings"][key] != getattr(s, key):
                raise ValueError(f"cannot resume {latest} with {key}={getattr(s, key)!r}: it was "
                                 f"trained with {key}={state['settings'][key]!r}")
        opt = _optimizer(s, model)
        opt.load_state_dict(ck.optimizer_state)
        log(f"resumed from {latest} (step {state['step']})")
    else:
        model = PaLM(config, seed=s.seed, mesh=mesh)
        opt = _optimizer(s, model)
        state = {"step": 0, "data_step": 0, "loss_avg": None, "skipped": [],
                 "settings": {k: getattr(s, k) for k in ("seed", "batch_size", "seq_len", "optimizer",
                                                          "schedule", "lr", "max_grad_norm")}}
        checkpoint.save(ckpt_dir, model, opt, state, step=0, keep=s.keep,  # a rollback target
                        tokenizer_path=tokenizer.model_path)

    metrics_path = os.path.join(s.out, "metrics.jsonl") if main else os.devnull
    start = time.perf_counter()
    last: dict = {}
    # With a time budget the bar counts seconds (its ETA is then the budget's end), else steps.
    by_time = s.time_budget is not None
    bar = tqdm(total=round(s.time_budget) if by_time else s.steps, initial=0 if by_time else state["step"],
               unit="s" if by_time else "step", disable=not s.progress, dynamic_ncols=True)
    try:
        while state["step"] < s.steps:
            spent = s.time_budget is not None and time.perf_counter() - start > s.time_budget
            if _any_rank(mesh, spent):  # every rank stops at the same step
                log(f"time budget of {s.time_budget:.0f} s spent at step {state['step']}")
                break
            tokens = _data_share(mesh, train_data.batch(state["data_step"], s.batch_size))
            t0 = time.perf_counter()
            model.zero_grad()
            out = _accumulate(model, tokens, s.accumulate, s.batch_size // s.accumulate * s.seq_len)
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
                model, opt, state = _roll_back(ckpt_dir, config, s, state, spike, log, mesh)
                continue
            elapsed = time.perf_counter() - t0
            avg = state["loss_avg"]
            state.update(step=step, data_step=state["data_step"] + 1,
                         loss_avg=out["loss"] if avg is None else 0.95 * avg + 0.05 * out["loss"])
            state = _skip_forward(state)
            last = {"step": step, "loss": out["loss"], "ce": out["ce"], "lr": lr, "grad_norm": grad_norm,
                    "tokens_per_s": s.batch_size * s.seq_len / elapsed}
            if step % s.eval_every == 0 or step == s.steps:
                last.update(_evaluate(model, val_data, tokenizer, s))
                log(f"step {step}: loss {out['loss']:.4f} val_loss {last['val_loss']:.4f} "
                    f"val_bpb {last['val_bpb']:.3f} lr {lr:.2e} {last['tokens_per_s']:,.0f} tok/s")
            with open(metrics_path, "a") as f:
                f.write(json.dumps(last) + "\n")
            if "val_loss" in last and main:
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
        if main:
            _rewrite_last_line(metrics_path, last)
            write_loss_png(metrics_path, os.path.join(s.out, "loss.png"))
    checkpoint.save(ckpt_dir, model, opt, state, step=state["step"], keep=s.keep,
                    tokenizer_path=tokenizer.model_path)
    if s.sample_tokens:
        # generation runs on an unsharded model: a model-sharded one is gathered for the main rank
        weights = model.state_dict() if mesh is not None and mesh.model > 1 else None
        if main:
            sampler = model if weights is None else PaLM(config)
            if weights is not None:
                sampler.load_state_dict(weights)
            prompt, sample = _greedy_sample(sampler, tokenizer, val_data, s.sample_tokens)
            log(f"sample (greedy, after a held-out prompt):\n{prompt}\033[1m{sample}\033[0m")
            last = dict(last, sample_prompt=prompt, sample=sample)
    return last if main else {}


def _rewrite_last_line(metrics_path: str, last: dict) -> None:
    """The last step's line of metrics.jsonl, now with its evaluation."""
    with open(metrics_path) as f:
        lines = f.readlines()
    lines[-1] = json.dumps(last) + "\n"
    with open(metrics_path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(metrics_path + ".tmp", metrics_path)


def _accumulate(model: PaLM, tokens: np.ndarray, micro_batches: int, micro_tokens: int) -> dict:
    """forward_backward over ``micro_batches`` equal slices of the batch's rows; gradients add
    up (the optimizer scales them by 1/micro_batches), losses are averaged. Packed windows
    count the same number of targets per row, so this equals one big batch. Each slice's loss
    is a mean over ``micro_tokens``, the targets of that slice over every data rank; the
    returned loss is averaged over the data ranks (the same on every rank)."""
    outs = [model.forward_backward(part[:, :-1], part[:, 1:], total_tokens=micro_tokens)
            for part in np.array_split(tokens, micro_batches)]
    stats = np.array([np.mean([o["loss"] for o in outs]), np.mean([o["ce"] for o in outs])], np.float32)
    if model.mesh is not None and model.mesh.data > 1:
        model.mesh.data_comm.all_reduce_sum(stats)
        stats /= model.mesh.data
    return {"loss": float(stats[0]), "ce": float(stats[1]), "tokens": sum(o["tokens"] for o in outs)}


def _silent(_: str) -> None:
    pass


def _main_first(mesh, make):
    """make() on the main rank, then on the others (which find what it wrote)."""
    if mesh is None:
        return make()
    if mesh.is_main:
        try:
            return make()
        finally:
            mesh.barrier()
    mesh.barrier()
    return make()


def _any_rank(mesh, flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any (so that all of them take the same branch)."""
    if mesh is None:
        return flag
    value = np.array([float(flag)], np.float32)
    mesh.model_comm.all_reduce_max(value)
    mesh.data_comm.all_reduce_max(value)
    return bool(value[0])


def _data_share(mesh, rows: np.ndarray) -> np.ndarray:
    """This data rank's equal share of a batch's rows."""
    if mesh is None or mesh.data == 1:
        return rows
    n = len(rows) // mesh.data
    return rows[mesh.data_index * n:(mesh.data_index + 1) * n]


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


def _roll_back(ckpt_dir, config, s: TrainSettings, state: dict, why: str, log, model_mesh=None):
    """Back to the newest checkpoint, skipping the batch that spiked (and everything the
    rolled-back steps had consumed is replayed, except that batch)."""
    bad = state["data_step"]
    ck = checkpoint.load(checkpoint.latest(ckpt_dir), config=config, mesh=model_mesh)
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
    """Validation loss, perplexity and bits per byte over the first eval_batches batches (each
    data rank takes its share of every batch; the sums are then added over the data axis)."""
    sums = np.zeros(4)  # Σ loss·tokens, Σ ce·tokens (nats), tokens, bytes
    for k in range(s.eval_batches):
        batch = _data_share(model.mesh, data.batch(k, s.batch_size))
        out = model.forward_backward(batch[:, :-1], batch[:, 1:])
        sums += [out["loss"] * out["tokens"], out["ce"] * out["tokens"], out["tokens"],
                 sum(len(tokenizer.decode(row).encode()) for row in batch[:, 1:])]
    model.zero_grad()
    if model.mesh is not None and model.mesh.data > 1:
        total = sums.astype(np.float32)
        model.mesh.data_comm.all_reduce_sum(total)
        sums = total.astype(np.float64)
    return {"val_loss": float(sums[0] / sums[2]), "val_ppl": math.exp(sums[1] / sums[2]),
            "val_bpb": float(sums[1] / math.log(2) / max(sums[3], 1))}
