"""The training loop (PALM_SPEC.md, "Training recipe"): data, schedule, clipping, evaluation,
checkpoints, resume and the loss-spike guard, around the C++ model and optimizer.

    result = palmcore.train("notes/", out="runs/notes", steps=500)          # the Python face
    summary = run(settings("notes/", out="runs/notes", steps=500))         # what it (and the CLI) call

Nothing is lost and nothing is done twice:
- One run per folder: the run holds an exclusive lock on ``<out>/.lock`` (runlock.py). A folder
  that holds a run is refused unless ``resume`` continues it or ``force`` replaces it (the old
  run stays whole until the new one has its first checkpoint: runfolder.py).
- A step is atomic: Ctrl-C or SIGTERM only sets a flag, which the loop reads between steps (on
  a mesh, every rank reads it at the same step). The run then saves a checkpoint and stops, so
  ``--resume`` continues exactly where it left off.
- metrics.jsonl is append-only: a step replayed after a rollback (or after resuming from an
  older checkpoint) is appended again, marked ``"replay": true``; a rollback adds an
  ``"event": "rollback"`` line. For each step, the last line is the truth.
- A run whose loss keeps spiking stops after ``max_rollbacks`` rollbacks without a new
  checkpoint in between (TrainingDiverged), instead of rolling back forever.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import shutil
import signal
import threading
import time
from typing import Callable

import numpy as np
from tqdm import tqdm

from palmcore import _core, checkpoint, checks, runfolder, schedules
from palmcore.config import PaLMConfig
from palmcore.data import PackedDataset, TokenCache, fitting_seq_len, stdlib_files, text_files
from palmcore.distributed import Mesh, launched_by_mpi
from palmcore.files import read_json_object
from palmcore.model import PaLM
from palmcore.optim import Adafactor, AdamW
from palmcore.plan import MeshShape
from palmcore.plot import read_metrics, write_loss_png
from palmcore.runlock import RunLock
from palmcore.tokenizer import Tokenizer

SAMPLING = dict(temperature=0.8, top_k=40, top_p=0.95)  # the end-of-run sample's settings


@dataclasses.dataclass
class TrainSettings:
    corpus: list[str] | None          # files, folders or globs; None: the Python standard library's sources
    out: str
    tokenizer: str | None = None      # a .model to reuse; default: train one into out/
    vocab_size: int = 10000           # for a tokenizer trained here (at most: SentencePiece may make fewer)
    preset: str = "seed"
    overrides: dict = dataclasses.field(default_factory=dict)
    batch_size: int = 8
    accumulate: int = 1               # micro-batches per step (batch_size rows split evenly)
    seq_len: int | None = 256         # None: 256, or what fits a corpus too small for it
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
    max_rollbacks: int = 5            # rollbacks in a row (no checkpoint between) before giving up
    progress: bool = True             # a tqdm progress bar on stderr
    sample_tokens: int = 40           # a sampled continuation of a held-out prompt at the end
    mesh: str = "data=1,model=1"      # data x model ranks (launch with mpiexec -n data·model)
    precision: str = "fp32"           # or "bf16": PALM_SPEC "Precision" (float32 master weights)
    device: str = "cpu"               # or "cuda" / "cuda:N"

    def check(self) -> None:
        """Every setting's kind and range (TypeError / ValueError naming it)."""
        for name in ("vocab_size", "batch_size", "accumulate", "eval_every", "eval_batches",
                     "checkpoint_every", "keep", "warmup_steps"):
            checks.integer(name, getattr(self, name), 1)
        if self.seq_len is not None:
            checks.integer("seq_len", self.seq_len, 1)
        for name in ("steps", "spike_warmup", "max_rollbacks", "sample_tokens"):
            checks.integer(name, getattr(self, name), 0)
        checks.integer("seed", self.seed, 0, 2**64 - 1)
        if self.time_budget is not None:
            checks.real("time_budget", self.time_budget, low=0.0)
        if self.lr is not None:
            checks.real("lr", self.lr, low=0.0)
        checks.real("max_grad_norm", self.max_grad_norm, low=0.0, low_open=True)
        checks.real("spike_factor", self.spike_factor, low=1.0, low_open=True)
        if self.optimizer not in ("adafactor", "adamw"):
            raise ValueError(f"optimizer must be 'adafactor' or 'adamw', got {self.optimizer!r}")
        if self.schedule not in ("palm", "cosine"):
            raise ValueError(f"schedule must be 'palm' or 'cosine', got {self.schedule!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ValueError(f"the output folder {self.out} is a file")
        _check_batch_memory(self)
        explicit = self.overrides.get("max_seq_len")
        if explicit is not None and not (isinstance(explicit, int) and explicit >= (self.seq_len or 1)):
            raise ValueError(f"seq_len {self.seq_len} does not fit the max_seq_len {explicit!r} that was "
                             "set explicitly: lower the sequence length or raise max_seq_len")

    @property
    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-2 if self.optimizer == "adafactor" else 3e-4


class TrainingDiverged(RuntimeError):
    """The loss kept spiking: rolling back further would loop forever."""


class RunFolderHoldsRun(ValueError):
    """A new run was asked for in a folder that already holds one (neither resume nor force)."""


DEFAULT_RUN_SECONDS = 540.0  # the embedded default run (no corpus given) stops after this
# ... evaluating every 40 steps on 2 batches: ~12 points of its curve on a 2-core machine (~1 s a
# step, ~0.9 s an evaluation batch), for ~4% of its time
DEFAULT_RUN_EVALUATION = dict(eval_every=40, eval_batches=2)
DEFAULT_SEQ_LEN = 256
DEFAULTS = {**{f.name: f.default for f in dataclasses.fields(TrainSettings) if f.default is not dataclasses.MISSING},
            "steps": 100_000, "seq_len": DEFAULT_SEQ_LEN}  # what settings() gives a setting not given

# What a resume takes from the run's checkpoint when not given: FIXED settings must agree with
# it when given again; CARRIED ones may change (and the checkpoints then record the new value).
FIXED = ("preset", "tokenizer", "vocab_size", "seq_len", "batch_size", "optimizer", "lr", "schedule", "warmup_steps",
         "max_grad_norm", "seed")
CARRIED = ("corpus", "steps", "accumulate", "precision", "eval_every", "eval_batches", "checkpoint_every", "keep",
           "spike_factor", "spike_warmup", "max_rollbacks", "sample_tokens")


@dataclasses.dataclass
class TrainResult:
    """What palmcore.train returns: the run folder, its summary (steps, tokens, wall_s,
    stopped_by, checkpoint, the last evaluation's val_loss / val_ppl / val_bpb, the sample...),
    and the trained model and tokenizer, loaded from the final checkpoint (None on a mesh rank
    other than the main one)."""

    run: str
    metrics: dict
    model: PaLM | None
    tokenizer: Tokenizer | None


def train(corpus=None, *, texts=None, out: str = "runs/default", steps: int | None = None,
          time_budget: float | None = None, device: str = "cpu", progress: bool = True, callback=None,
          resume: bool = False, force: bool = False, **fields) -> TrainResult:
    """Train a PaLM, as `palmcore train` does (the same defaults and checks), from Python:

        result = palmcore.train("my_notes/", out="runs/notes", steps=500, d_model=128)
        result = palmcore.train(texts=["first document", "second document"], out="runs/two", steps=50)
        print(result.metrics["val_bpb"]); palmcore.generate(result, "Once upon")

    ``corpus``: files, folders or globs (a string or a list; None and no ``texts``: the Python
    standard library, for at most DEFAULT_RUN_SECONDS). ``texts``: a list of documents held in
    memory (written, once the run folder is locked, into a fresh ``out/texts``).
    ``callback(step, metrics)`` is called after every step; returning False stops with a
    checkpoint, raising saves one and re-raises. A folder that holds a run is refused unless
    ``resume`` continues it or ``force`` replaces it. Other keywords: TrainSettings fields
    (batch_size, seq_len, lr, precision, ...) or PaLMConfig fields (d_model, n_layers, ...)."""
    if texts is not None:
        if corpus is not None:
            raise ValueError("give corpus or texts, not both")
        _check_texts(texts)
        corpus = os.path.join(out, "texts")
    s = settings(corpus, out=out, steps=steps, time_budget=time_budget, device=device, progress=progress,
                 resume=resume, **fields)
    summary = run(s, resume=resume, callback=callback, force=force, texts=texts)
    if not summary:  # another rank of a mesh
        return TrainResult(s.out, {}, None, None)
    from palmcore.text import load  # noqa: PLC0415 (text imports checkpoint, which imports model)

    model, tokenizer = load(summary["checkpoint"], device=device, precision=s.precision)
    return TrainResult(s.out, summary, model, tokenizer)


def settings(corpus=None, *, out: str = "runs/default", steps: int | None = None,
             time_budget: float | None = None, overrides: dict | None = None, resume: bool = False,
             **fields) -> TrainSettings:
    """TrainSettings with the CLI's defaults, for `palmcore train` and palmcore.train alike:
    ``corpus`` is files, folders or globs (a string or a list; None: the Python standard
    library, stopped after DEFAULT_RUN_SECONDS unless time_budget says otherwise, and evaluated
    as DEFAULT_RUN_EVALUATION says); ``steps`` defaults to 100,000; evaluation and checkpoints
    share ``eval_every``; ``seq_len`` defaults to 256, or less for a corpus too small for it.
    ``fields`` are TrainSettings fields (batch_size, lr, device, ...) or PaLMConfig fields
    (d_model, n_experts, ...: overrides of the preset); anything else is a TypeError naming it.
    With ``resume``, the run in ``out`` (once it has a checkpoint) gives its model configuration
    and every FIXED or CARRIED setting not given here; a FIXED one given must agree with it."""
    known = {f.name for f in dataclasses.fields(TrainSettings)} - {"corpus", "out", "steps", "time_budget", "overrides"}
    config_fields = {f.name for f in dataclasses.fields(PaLMConfig)}
    unknown = sorted(set(fields) - known - config_fields)
    if unknown:
        raise TypeError(f"unknown training setting(s): {', '.join(unknown)} (TrainSettings or PaLMConfig fields)")
    run_fields = {k: v for k, v in fields.items() if k in known}
    model_fields = {**(overrides or {}), **{k: v for k, v in fields.items() if k not in known}}
    if corpus is not None:
        run_fields["corpus"] = [os.fspath(c) for c in ([corpus] if isinstance(corpus, (str, os.PathLike)) else corpus)]
    if steps is not None:
        run_fields["steps"] = steps
    if resume:
        run_fields, model_fields = _with_the_runs_settings(out, run_fields, model_fields)
    default_run = run_fields.get("corpus") is None
    defaults = {"corpus": None, "steps": DEFAULTS["steps"], "seq_len": None, **(DEFAULT_RUN_EVALUATION if default_run
                                                                                else {})}
    run_fields = {**defaults, **run_fields}
    return TrainSettings(out=out, time_budget=DEFAULT_RUN_SECONDS if default_run and time_budget is None else time_budget,
                         overrides=model_fields, **{"checkpoint_every": run_fields.get("eval_every", 100), **run_fields})


def _with_the_runs_settings(out: str, run_fields: dict, model_fields: dict) -> tuple[dict, dict]:
    """(run_fields, model_fields) completed from the newest checkpoint in ``out`` (unchanged
    when there is none); a FIXED setting or a model field given that differs from the run's is
    refused, naming both values."""
    latest = checkpoint.latest(os.path.join(out, "checkpoints"))
    if latest is None:
        return run_fields, model_fields
    stored = _trainer_state(read_json_object(os.path.join(latest, "trainer.json")),
                            os.path.join(latest, "trainer.json"))["settings"]
    config = PaLMConfig.from_dict(read_json_object(os.path.join(latest, "config.json"))).to_dict()
    differences = _differences(stored, run_fields) + [
        f"--set {k}={json.dumps(v)} given, the run has {k}={json.dumps(config[k])}"
        for k, v in model_fields.items() if k in config and config[k] != v]
    if differences:
        raise ValueError(f"cannot resume {out}: {'; '.join(differences)} (leave a setting out to take the run's)")
    return {**{k: stored[k] for k in FIXED + CARRIED if k in stored}, **run_fields}, {**model_fields, **config}


def _differences(stored: dict, given: dict) -> list[str]:
    """'--seq-len 128 given, the run has 256' for each FIXED setting given that differs from the run's."""
    return [f"--{k.replace('_', '-')} {given[k]} given, the run has {stored[k]}"
            for k in FIXED if k in stored and k in given and given[k] != stored[k]]


def run(s: TrainSettings, resume: bool = False, log: Callable[[str], None] = tqdm.write,
        callback: Callable[[int, dict], object] | None = None, force: bool = False,
        texts: list[str] | None = None) -> dict:
    """Train as ``s`` says, writing checkpoints and metrics.jsonl under ``s.out``; with
    ``resume``, continue from the newest checkpoint there (whatever mesh wrote it); with
    ``force``, replace the run there (a folder that holds one is refused otherwise: it stays
    whole until the new run has its first checkpoint). ``texts``: documents held in memory,
    written under the run's lock into a fresh ``s.out/texts`` (which ``s.corpus`` names). Returns a
    summary of the run (on the main rank; {} on the others): steps, tokens, wall_s, the last
    evaluation (val_loss, val_ppl, val_bpb at val_step), checkpoint, plot, stopped_by and the
    end-of-run sample (sample_prompt, sample).

    On a mesh of data x model ranks every rank runs this: data rank d takes its share of each
    batch's rows, the model ranks split the parameters; the main rank alone logs and writes.

    ``callback(step, metrics)`` is called on the main rank after every step with that step's
    metrics.jsonl line; returning False stops the run there, with a checkpoint (stopped_by
    "callback"); an exception it raises is re-raised once a checkpoint is saved."""
    s.check()
    _check_callback(callback)
    if resume and force:
        raise ValueError("resume continues the run in the folder and force replaces it: give one of them")
    shape = MeshShape.parse(s.mesh)
    if s.batch_size % (s.accumulate * shape.data):
        raise ValueError(f"accumulate ({s.accumulate}) x the data axis ({shape.data}) must divide "
                         f"batch_size ({s.batch_size})")
    mesh = Mesh(shape.data, shape.model, device=s.device) if shape.size > 1 or launched_by_mpi() else None
    main = mesh is None or mesh.is_main
    if not main:
        log = _silent
        s = dataclasses.replace(s, progress=False)
    os.makedirs(s.out, exist_ok=True)
    with RunLock(s.out) if main else contextlib.nullcontext():
        replacement = _claim(s.out, resume, force) if main else None
        with replacement or contextlib.nullcontext():
            if texts is not None and main:
                _write_texts(os.path.join(s.out, "texts"), texts)
            training = _Run(s, mesh, log, callback if main else None)
            with _StopRequests() as stop:
                model, opt, state = training.start(resume)
                if replacement:
                    replacement.discard()  # the new run has its first checkpoint
                return training.train(model, opt, state, stop)


def _claim(out: str, resume: bool, force: bool) -> runfolder.Replacement | None:
    """The folder for this run (under its lock): a replacement a crash cut short is finished or
    undone; a run already there (one with a checkpoint) is refused unless resumed or forced.
    Replaced are a forced run and what a start that never reached its first checkpoint left
    (a tokenizer, a token cache: never silently reused by a new run)."""
    runfolder.recover(out)
    if resume or not runfolder.run_entries(out):
        return None
    latest = checkpoint.latest(os.path.join(out, "checkpoints"))
    if latest and not force:
        raise RunFolderHoldsRun(f"{out} already holds a run (checkpoints up to {os.path.basename(latest)}): "
                                "`palmcore train --resume` (resume=True) continues it, `--force` (force=True) "
                                "replaces it, or choose another --out")
    return runfolder.Replacement(out)


class _Run:
    def __init__(self, s: TrainSettings, mesh, log, callback=None):
        self.s, self.mesh, self.log, self.callback = s, mesh, log, callback
        self.main = mesh is None or mesh.is_main
        corpus = stdlib_files() if s.corpus is None else s.corpus
        # the main rank trains the tokenizer and builds the token cache; the others then read them
        self.tokenizer = _main_first(mesh, lambda: _tokenizer(s, corpus, log))
        cache = _main_first(mesh, lambda: TokenCache.build(corpus, self.tokenizer, os.path.join(s.out, "data")))
        context = s.seq_len  # the model's max_seq_len: the training window, or the default one if a corpus set it
        if s.seq_len is None:
            self.s = s = dataclasses.replace(s, seq_len=_fitting_seq_len(cache, s, log))
            context = DEFAULT_SEQ_LEN  # a small corpus's short window must not bound generation
        self.train_data = PackedDataset(cache, s.seq_len, "train", seed=s.seed)
        self.val_data = PackedDataset(cache, s.seq_len, "val", seed=s.seed)
        if self.train_data.split_note:
            log(self.train_data.split_note)
        self.config = PaLMConfig.preset(s.preset, **{**s.overrides, "vocab_size": self.tokenizer.vocab_size,
                                                     "max_seq_len": s.overrides.get("max_seq_len", context)})
        self.lr_at = (schedules.palm(s.peak_lr) if s.schedule == "palm" else
                      schedules.cosine(s.peak_lr, s.warmup_steps, max(s.steps, s.warmup_steps + 1)))
        self.ckpt_dir = os.path.join(s.out, "checkpoints")
        self.metrics = _Metrics(os.path.join(s.out, "metrics.jsonl") if self.main else None)
        self.plot_path = os.path.join(s.out, "loss.png")
        self.elapsed = lambda: 0.0  # seconds of the whole run (every session of it)
        self.record = {k: getattr(s, k) for k in FIXED + CARRIED}  # what a resume takes from a checkpoint

    def start(self, resume: bool):
        """(model, optimizer, state): the newest checkpoint's with ``resume`` (when there is
        one), else a new model's, saved at once as step 0 (a rollback target)."""
        s, log = self.s, self.log
        latest = checkpoint.latest(self.ckpt_dir) if resume else None
        if latest:
            model, opt, state = self._load(latest)
            log(f"resumed from {latest} (step {state['step']})")
        else:
            model = PaLM(self.config, seed=s.seed, mesh=self.mesh, device=s.device, precision=s.precision)
            opt = _optimizer(s, model)
            state = {"step": 0, "data_step": 0, "loss_avg": None, "skipped": []}
            self._save(model, opt, state)
        return model, opt, state

    def train(self, model: PaLM, opt, state: dict, stop: "_StopRequests") -> dict:
        s, log = self.s, self.log
        self.stop = stop
        start, resumed_from, earlier = time.perf_counter(), state["step"], state.get("wall_s", 0.0)
        self.elapsed = lambda: earlier + time.perf_counter() - start
        stopped_by, rollbacks, last_eval = "steps", 0, {}
        idle = _IdleExperts(log)
        # With a time budget the bar counts seconds (its ETA is then the budget's end), else steps.
        by_time = s.time_budget is not None
        bar = tqdm(total=round(s.time_budget) if by_time else s.steps, initial=0 if by_time else state["step"],
                   unit="s" if by_time else "step", disable=not s.progress, dynamic_ncols=True)
        try:
            while state["step"] < s.steps:
                spent = by_time and time.perf_counter() - start > s.time_budget
                signalled = self.stop.requested
                if _any_rank(self.mesh, spent or signalled):  # every rank stops at the same step
                    stopped_by = "interrupt" if _any_rank(self.mesh, signalled) else "time budget"
                    log(f"stopping at step {state['step']}: " +
                        ("interrupted; saving a checkpoint" if stopped_by == "interrupt" else
                         f"time budget of {s.time_budget:.0f} s spent"))
                    break
                tokens = _data_share(self.mesh, self.train_data.batch(state["data_step"], s.batch_size))
                t0 = time.perf_counter()
                model.zero_grad()
                out = _accumulate(model, tokens, s.accumulate, s.batch_size // s.accumulate * s.seq_len)
                step = state["step"] + 1
                lr = self.lr_at(step)
                spike = _spike(out["loss"], state["loss_avg"], step, s)
                grad_norm = math.nan
                if not spike:
                    try:
                        grad_norm = opt.step(lr, s.max_grad_norm, grad_scale=1.0 / s.accumulate)
                    except _core.NonFiniteStep as e:  # a non-finite gradient norm, or update
                        spike = str(e)
                if _any_rank(self.mesh, bool(spike)):  # every rank rolls back together
                    spike = spike or "a spike on another rank"
                    rollbacks += 1
                    if rollbacks > s.max_rollbacks:
                        raise TrainingDiverged(
                            f"training diverged: {rollbacks} loss spikes in a row since the last checkpoint "
                            f"(the last at step {step}: {spike}). Lower the learning rate (now "
                            f"{s.peak_lr:g}; --lr) or max_grad_norm, or check the data; the checkpoints in "
                            f"{self.ckpt_dir} are intact")
                    model, opt, state = self._roll_back(state, spike)
                    continue
                elapsed = time.perf_counter() - t0
                avg = state["loss_avg"]
                state.update(step=step, data_step=state["data_step"] + 1,
                             loss_avg=out["loss"] if avg is None else 0.95 * avg + 0.05 * out["loss"])
                _skip_forward(state)
                line = {"step": step, "loss": out["loss"], "ce": out["ce"], "lr": lr, "grad_norm": grad_norm,
                        "tokens_per_s": s.batch_size * s.seq_len / elapsed}
                if "expert_load" in out:  # sparse layers: the routers' losses and the experts' shares
                    load = out["expert_load"]
                    line.update(balance=out["balance"], router_z=out["router_z"], expert_load=load,
                                expert_load_min=min(load), expert_load_max=max(load))
                    idle.observe(step, load)
                evaluation = {}
                if step % s.eval_every == 0 or step == s.steps:
                    evaluation = self._evaluate(model)
                    if evaluation:
                        line.update(evaluation)
                        last_eval = dict(evaluation, val_step=step)
                        log(f"step {step}: loss {out['loss']:.4f} val_loss {line['val_loss']:.4f} "
                            f"val_bpb {line['val_bpb']:.3f} lr {lr:.2e} {line['tokens_per_s']:,.0f} tok/s")
                self.metrics.append(line)
                if "val_loss" in line:
                    self._plot()
                bar.update(min(bar.total, round(time.perf_counter() - start)) - bar.n if by_time else 1)
                bar.set_postfix(step=step, loss=f"{out['loss']:.3f}", tok_s=f"{line['tokens_per_s']:,.0f}",
                                **({"load": f"{line['expert_load_min']:.2f}-{line['expert_load_max']:.2f}"}
                                   if "expert_load" in line else {}))
                if step % s.checkpoint_every == 0:
                    self._save(model, opt, state)
                    rollbacks = 0
                try:
                    wanted_stop = self.callback is not None and self.callback(step, dict(line)) is False
                except Exception:
                    log(f"the callback raised at step {step}: saving a checkpoint")
                    self._save(model, opt, state)
                    self._plot()
                    raise
                if _any_rank(self.mesh, wanted_stop):  # every rank stops at the same step
                    stopped_by = "callback"
                    log(f"stopping at step {step}: the callback asked to; saving a checkpoint")
                    break
                if evaluation is None:  # a stop requested during the evaluation
                    stopped_by = "interrupt"
                    log(f"stopping at step {step}: interrupted during the evaluation; saving a checkpoint")
                    break
        except KeyboardInterrupt:  # raised by code (the signals themselves only set a flag)
            stopped_by = "interrupt"
            log(f"interrupted at step {state['step']}: saving a checkpoint")
        finally:
            bar.close()
        if stopped_by == "time budget" and last_eval.get("val_step") != state["step"] and state["step"] > 0:
            evaluation = self._evaluate(model)  # stopped between evaluations: evaluate once more
            if evaluation:
                last_eval = dict(evaluation, val_step=state["step"])
                self.metrics.append(dict(evaluation, step=state["step"], final=True))
                log(f"step {state['step']}: val_loss {evaluation['val_loss']:.4f} "
                    f"val_bpb {evaluation['val_bpb']:.3f} (final)")
        path = self._save(model, opt, state)
        self._plot()  # at every stop: steps, time budget, interrupt, callback
        summary = {"steps": state["step"], "tokens": state["step"] * s.batch_size * s.seq_len,
                   "wall_s": self.elapsed(), "stopped_by": stopped_by, "checkpoint": path,
                   **({"resumed_from": resumed_from, "session_s": time.perf_counter() - start} if resumed_from else {}),
                   "plot": self.plot_path if os.path.exists(self.plot_path) else None, **last_eval}
        if s.sample_tokens and stopped_by != "interrupt":
            summary.update(self._sample(model))
        return summary if self.main else {}

    def _load(self, path: str):
        ck = checkpoint.load(path, config=self.config, mesh=self.mesh, device=self.s.device,
                             precision=self.s.precision)
        state = _trainer_state(ck.trainer, os.path.join(path, "trainer.json"))
        differences = _differences(state["settings"], {k: getattr(self.s, k) for k in FIXED})
        if differences:
            raise ValueError(f"cannot resume {path}: {'; '.join(differences)}")
        if ck.optimizer_state is None:
            raise ValueError(f"cannot resume from {path}: it holds no optimizer state")
        opt = _optimizer(self.s, ck.model)
        opt.load_state_dict(ck.optimizer_state)
        return ck.model, opt, _skip_forward(state)

    def _plot(self) -> None:
        if self.main and os.path.exists(self.metrics.path):
            write_loss_png(self.metrics.path, self.plot_path)

    def _save(self, model: PaLM, opt, state: dict) -> str:
        state.update(wall_s=self.elapsed(), settings=self.record)
        return checkpoint.save(self.ckpt_dir, model, opt, state, step=state["step"], keep=self.s.keep,
                               tokenizer_path=self.tokenizer.model_path)

    def _roll_back(self, state: dict, why: str):
        """Back to the newest checkpoint, skipping the batch that spiked (and everything the
        rolled-back steps had consumed is replayed, except that batch)."""
        bad = state["data_step"]
        model, opt, restored = self._load(checkpoint.latest(self.ckpt_dir))
        restored["skipped"] = sorted(set(restored["skipped"]) | set(state["skipped"]) | {bad})
        self.log(f"loss spike at step {state['step'] + 1} ({why}): rolled back to step {restored['step']}, "
                 f"skipping data batch {bad}")
        self.metrics.append({"event": "rollback", "at_step": state["step"] + 1, "to_step": restored["step"],
                             "skipped_batch": bad, "reason": why})
        # replay from the checkpoint's data position, stepping over every skipped batch
        return model, opt, _skip_forward(restored)

    def _evaluate(self, model: PaLM) -> dict | None:
        """Validation loss, perplexity and bits per byte over the first eval_batches batches
        (each data rank takes its share of every batch; the sums are then added over the data
        axis). None when a stop was requested meanwhile (checked between batches)."""
        s = self.s
        sums = np.zeros(4)  # Σ loss·tokens, Σ ce·tokens (nats), tokens, bytes
        for k in range(s.eval_batches):
            if _any_rank(self.mesh, self.stop.requested):
                model.zero_grad()
                return None
            batch = _data_share(model.mesh, self.val_data.batch(k, s.batch_size))
            out = model.forward_backward(batch[:, :-1], batch[:, 1:])
            sums += [out["loss"] * out["tokens"], out["ce"] * out["tokens"], out["tokens"],
                     sum(len(self.tokenizer.decode(row).encode()) for row in batch[:, 1:])]
        model.zero_grad()
        if model.mesh is not None and model.mesh.data > 1:
            total = sums.astype(np.float32)
            model.mesh.data_comm.all_reduce_sum(total)
            sums = total.astype(np.float64)
        return {"val_loss": float(sums[0] / sums[2]), "val_ppl": math.exp(sums[1] / sums[2]),
                "val_bpb": float(sums[1] / math.log(2) / max(sums[3], 1))}

    def _sample(self, model: PaLM) -> dict:
        """A continuation of the first half of the first held-out window, sampled with the
        default settings (SAMPLING) and the run's seed. Generation runs on an unsharded model:
        a model-sharded one is gathered for the main rank."""
        weights = model.state_dict() if self.mesh is not None and self.mesh.model > 1 else None
        if not self.main:
            return {}
        if weights is not None:
            model = PaLM(self.config, device=model.device, precision=self.s.precision)
            model.load_state_dict(weights)
        ids = [int(t) for t in self.val_data.window(0)[: max(1, self.s.seq_len // 2)]]
        new = model.generate([ids], max_new_tokens=min(self.s.sample_tokens, self.config.max_seq_len - len(ids)),
                             stop_tokens=(), seed=self.s.seed, **SAMPLING)[0]
        return {"sample_prompt": self.tokenizer.decode(ids), "sample": self.tokenizer.decode(new),
                "sample_settings": dict(SAMPLING, seed=self.s.seed)}


class _StopRequests:
    """While entered (in the main thread), SIGINT and SIGTERM set ``requested`` instead of
    interrupting: the loop stops at the next step boundary, so no step is half done."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self) -> "_StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._request)
        return self

    def _request(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _Metrics:
    """metrics.jsonl, append-only. A step at or below the highest step already logged (the
    file may hold an earlier attempt) is marked ``"replay": true``."""

    def __init__(self, path: str | None):
        self.path = path
        steps = [row["step"] for row in read_metrics(path) if isinstance(row.get("step"), int)] if path else []
        self.highest = max(steps, default=0)
        if path:
            self._repair_cut_line()

    def _repair_cut_line(self) -> None:
        """A crash mid-write can leave a last line without its newline: end it, so the next
        line starts on its own."""
        with open(self.path, "ab+") as f:
            if f.tell() and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
                f.write(b"\n")

    def append(self, line: dict) -> None:
        if self.path is None:
            return
        if "step" in line and line["step"] <= self.highest and not line.get("final"):
            line = dict(line, replay=True)
        self.highest = max(self.highest, line.get("step", 0))
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")


def _check_batch_memory(s: TrainSettings) -> None:
    """A batch's token windows (int32, and the copies the steps make of them) must fit: an
    absurd --batch-size is refused here, before NumPy runs out of memory building one. The
    model's own tensors are checked by its memory guard when it sizes them."""
    seq_len = s.seq_len or DEFAULT_SEQ_LEN
    need = 3 * s.batch_size * (seq_len + 1) * 4
    available = _core.available_memory()
    if need > available:
        raise ValueError(f"out of memory: a batch of {s.batch_size} x {seq_len + 1} tokens needs "
                         f"{need / 2**30:.2f} GiB ({need} bytes) but {available / 2**30:.2f} GiB "
                         f"({available} bytes) are available")


def _trainer_state(trainer: dict, path: str) -> dict:
    """The loop's state from a checkpoint's trainer.json, every field checked."""
    def field(name, kind, ok=lambda v: True):
        value = trainer.get(name)
        if not isinstance(value, kind) or isinstance(value, bool) or not ok(value):
            raise ValueError(f"{path} is damaged: '{name}' is {value!r}")
        return value

    in_range = lambda v: 0 <= v < 2**62  # noqa: E731
    return {"step": field("step", int, in_range), "data_step": field("data_step", int, in_range),
            "loss_avg": None if trainer.get("loss_avg") is None else
            field("loss_avg", (int, float), math.isfinite),
            "skipped": [int(b) for b in field("skipped", list, lambda v: all(
                isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 2**62 for b in v))],
            "settings": field("settings", dict),
            "wall_s": 0.0 if trainer.get("wall_s") is None else field("wall_s", (int, float),
                                                                      lambda v: math.isfinite(v) and v >= 0)}


class _IdleExperts:
    """Warns (once per stretch) when an expert has received no token, in any sparse layer on
    average, for `patience` steps in a row: a router that has given up on it."""

    def __init__(self, log, patience: int = 100):
        self.log, self.patience, self.idle = log, patience, None

    def observe(self, step: int, load: list) -> None:
        if self.idle is None:
            self.idle = [0] * len(load)
        for e, share in enumerate(load):
            self.idle[e] = self.idle[e] + 1 if share == 0.0 else 0
            if self.idle[e] == self.patience:
                self.log(f"warning: expert {e} has received no token for {self.patience} steps (step {step}); "
                         "the router may have collapsed (raise router_aux_loss?)")


def _accumulate(model: PaLM, tokens: np.ndarray, micro_batches: int, micro_tokens: int) -> dict:
    """forward_backward over ``micro_batches`` equal slices of the batch's rows; gradients add
    up (the optimizer scales them by 1/micro_batches), losses are averaged. Packed windows
    count the same number of targets per row, so this equals one big batch. Each slice's loss
    is a mean over ``micro_tokens``, the targets of that slice over every data rank; the
    returned loss is averaged over the data ranks (the same on every rank)."""
    outs = [model.forward_backward(part[:, :-1], part[:, 1:], total_tokens=micro_tokens)
            for part in np.array_split(tokens, micro_batches)]
    sparse = "expert_load" in outs[0]  # a mixture of experts: its routers' losses and load too
    rows = [[o["loss"], o["ce"]] + ([o["balance"], o["router_z"], *o["expert_load"]] if sparse else []) for o in outs]
    stats = np.mean(np.array(rows, np.float64), axis=0).astype(np.float32)
    if model.mesh is not None and model.mesh.data > 1:
        model.mesh.data_comm.all_reduce_sum(stats)
        stats /= model.mesh.data
    out = {"loss": float(stats[0]), "ce": float(stats[1]), "tokens": sum(o["tokens"] for o in outs)}
    if sparse:
        out.update(balance=float(stats[2]), router_z=float(stats[3]), expert_load=[float(v) for v in stats[4:]])
    return out


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


def _tokenizer(s: TrainSettings, corpus: list[str], log) -> Tokenizer:
    path = s.tokenizer or os.path.join(s.out, "tokenizer.model")
    if os.path.exists(path):
        return Tokenizer(path)
    if s.tokenizer:
        raise ValueError(f"no tokenizer model at {s.tokenizer}")
    files, skipped = text_files(corpus)
    log(f"training a {s.vocab_size}-token tokenizer on {len(files)} files"
        + (f" ({len(skipped)} binary files left out)" if skipped else ""))
    tokenizer = Tokenizer.train_on_files(files, s.vocab_size, path)
    if tokenizer.vocab_size < s.vocab_size:
        log(f"the corpus is small: its tokenizer has {tokenizer.vocab_size} tokens (of the {s.vocab_size} asked)")
    return tokenizer


def _fitting_seq_len(cache: TokenCache, s: TrainSettings, log) -> int:
    """DEFAULT_SEQ_LEN (or an explicit max_seq_len below it), halved until both splits of the
    corpus hold a window: a small corpus trains, on shorter sequences (said in the log)."""
    wanted = min(DEFAULT_SEQ_LEN, s.overrides.get("max_seq_len", DEFAULT_SEQ_LEN))
    seq_len = fitting_seq_len(cache, wanted, s.seed)
    if seq_len < wanted:
        log(f"the corpus is small ({len(cache.tokens)} tokens): training on sequences of {seq_len} tokens "
            f"(--seq-len) instead of {wanted}")
    return seq_len


def _check_texts(texts) -> None:
    """texts: a non-empty list (or tuple) of strings."""
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"texts must be a list of strings (the documents), got a {type(texts).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is a {type(text).__name__}, not a string")
    if not texts:
        raise ValueError("texts is empty: give at least one document")


def _write_texts(folder: str, texts: list[str]) -> None:
    """``texts`` as the only files of ``folder``: written beside it, then put in its place."""
    fresh = f"{folder}.tmp-{os.getpid()}"
    if os.path.exists(fresh):
        shutil.rmtree(fresh)
    os.makedirs(fresh)
    for i, text in enumerate(texts):
        with open(os.path.join(fresh, f"text-{i:06d}.txt"), "w", encoding="utf-8") as f:
            f.write(text)
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.rename(fresh, folder)


def _check_callback(callback) -> None:
    """callback(step, metrics) must be callable so (checked before anything is trained)."""
    if callback is None:
        return
    if not callable(callback):
        raise TypeError(f"callback must be a function called as callback(step, metrics), got {callback!r}")
    try:
        signature = inspect.signature(callback)
    except (TypeError, ValueError):  # no signature to read (some builtins): called as it is
        return
    try:
        signature.bind(0, {})
    except TypeError as e:
        raise TypeError(f"callback must accept (step, metrics), but {getattr(callback, '__name__', callback)}"
                        f"{signature} does not: {e}") from None


def _optimizer(s: TrainSettings, model: PaLM):
    return Adafactor(model) if s.optimizer == "adafactor" else AdamW(model)


def _spike(loss: float, avg: float | None, step: int, s: TrainSettings) -> str | None:
    if not math.isfinite(loss):
        return f"loss {loss}"
    if avg is not None and step > s.spike_warmup and loss > s.spike_factor * avg:
        return f"loss {loss:.4f} > {s.spike_factor} x running average {avg:.4f}"
    return None


def _skip_forward(state: dict) -> dict:
    skipped = set(state["skipped"])
    while state["data_step"] in skipped:
        state["data_step"] += 1
    return state
