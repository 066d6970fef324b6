"""Checkpoints: one directory per step under a run's folder, written atomically.

    <root>/step-00000120/
        model.safetensors       every parameter by its spec name (float32)
        config.json             the PaLMConfig
        optimizer.safetensors   m.<name>, v.<name>; kind, settings and steps_taken as metadata
        trainer.json            whatever the training loop needs to resume (step, RNG, data, ...)
        tokenizer.model         the SentencePiece model, when the run has one
        complete.json           written last: the format and the files above

A checkpoint is built in a hidden ``.tmp-*`` directory and renamed into place, so a crash at
any moment leaves the earlier checkpoints intact and no half-written one visible. Nothing
complete is deleted before its replacement is in place: re-saving a step renames the old
directory aside (``.old-*``) first, and pruning renames a checkpoint aside before removing it.
Only directories holding ``complete.json`` and its files count. The next save removes what
killed writers left behind, and puts back a replaced checkpoint whose replacement never landed.
Only the newest ``keep`` are kept. Files and folders follow the process's umask.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile

import numpy as np

from palmcore.config import PaLMConfig
from palmcore.files import publish_directory, read_json_object
from palmcore.model import PaLM
from palmcore.tensorfile import load_file, save_file

_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_ASIDE = re.compile(r"^\.old-(step-\d{8,})-")
FORMAT = "palmcore-checkpoint/1"
MARKER = "complete.json"
_REQUIRED = ("model.safetensors", "config.json", "trainer.json")


@dataclasses.dataclass
class Checkpoint:
    path: str
    model: PaLM
    optimizer_state: dict | None  # for Adafactor/AdamW.load_state_dict
    trainer: dict


def save(root: str, model: PaLM, optimizer=None, trainer: dict | None = None, step: int | None = None,
         keep: int = 3, tokenizer_path: str | None = None) -> str:
    """Write a checkpoint of ``model`` (and ``optimizer``, ``trainer``, a copy of the tokenizer
    model) under ``root``; returns its directory. ``step`` defaults to the optimizer's count.

    A checkpoint holds full tensors whatever the mesh, so it loads on any other. On a mesh every
    rank must call this (the tensors are gathered); the main rank writes, the others wait."""
    if step is None:
        step = optimizer.steps_taken if optimizer is not None else int((trainer or {}).get("step", 0))
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    final = os.path.join(root, f"step-{step:08d}")
    weights = model.state_dict()
    bad = [n for n, w in weights.items() if not np.isfinite(w).all()]
    if bad:  # it could never be loaded again
        raise ValueError(f"refusing to save a checkpoint whose parameters are not finite: {bad[:3]}")
    state = optimizer.state_dict() if optimizer is not None else None
    mesh = model.mesh
    if mesh is not None and not mesh.is_main:
        mesh.barrier()  # until the main rank has written it
        return final
    try:
        os.makedirs(root, exist_ok=True)
        recover(root)
        _write(final, model, weights, state, trainer, step, tokenizer_path)
    finally:
        if mesh is not None:
            mesh.barrier()
    for old in list_checkpoints(root)[:-keep]:
        _remove(old if _STEP_DIR.match(os.path.basename(old)) else os.path.dirname(old))
    return final


def _write(final, model, weights, state, trainer, step, tokenizer_path) -> None:
    # re-saving a step: the old one stays whole (aside, as .old-step-N-*/checkpoint) until the new one is in
    publish_directory(final, lambda tmp: _write_files(tmp, model, weights, state, trainer, step, tokenizer_path),
                      tmp_prefix=".tmp-step-", aside_name="checkpoint")


def _write_files(tmp, model, weights, state, trainer, step, tokenizer_path) -> None:
    files = ["model.safetensors", "config.json", "trainer.json"]
    save_file(weights, os.path.join(tmp, "model.safetensors"), {"format": FORMAT})
    _write_json(os.path.join(tmp, "config.json"), model.config.to_dict())
    if state is not None:
        tensors = {f"m.{n}": a for n, a in state["m"].items()}
        tensors.update({f"v.{n}": a for n, a in state["v"].items()})
        save_file(tensors, os.path.join(tmp, "optimizer.safetensors"),
                  {"format": FORMAT, "kind": state["kind"], "steps_taken": state["steps_taken"],
                   "settings": json.dumps(state["settings"])})
        files.append("optimizer.safetensors")
    _write_json(os.path.join(tmp, "trainer.json"), dict(trainer or {}, step=step))
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, os.path.join(tmp, "tokenizer.model"))
        files.append("tokenizer.model")
    _write_json(os.path.join(tmp, MARKER), {"format": FORMAT, "step": step, "files": files})


def recover(root: str) -> None:
    """Tidy up after writers that were killed: remove ``.tmp-*`` folders, put back a checkpoint
    that was moved aside for a replacement that never landed, and drop the rest."""
    for name in os.listdir(root):
        path = os.path.join(root, name)
        aside = _ASIDE.match(name)
        if aside:
            final, old = os.path.join(root, aside.group(1)), os.path.join(path, "checkpoint")
            if not is_checkpoint(final) and is_checkpoint(old):
                if os.path.exists(final):
                    _remove(final)
                os.rename(old, final)
            shutil.rmtree(path, ignore_errors=True)
        elif name.startswith(".tmp-") and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)


def _remove(path: str) -> None:
    """Delete a checkpoint directory: renamed to a hidden name first, so that no half-deleted
    folder is ever seen under its step name."""
    root, name = os.path.split(path)
    trash = tempfile.mkdtemp(dir=root, prefix=f".tmp-removed-{name}-")
    os.rename(path, os.path.join(trash, name))
    shutil.rmtree(trash, ignore_errors=True)


def is_checkpoint(path: str) -> bool:
    """Whether ``path`` is a complete checkpoint: its marker and every file it names exist."""
    try:
        names = set(read_json_object(os.path.join(path, MARKER))["files"]) | set(_REQUIRED)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all(isinstance(n, str) and os.path.isfile(os.path.join(path, n)) for n in names)


def list_checkpoints(root: str) -> list[str]:
    """The complete checkpoints under ``root``, oldest first. A step whose folder is missing or
    incomplete while its previous version waits aside (a re-save that was killed between its
    two renames) is listed at the aside path: nothing complete is ever invisible."""
    if not os.path.isdir(root):
        return []
    found, aside = {}, {}
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if _STEP_DIR.match(name) and is_checkpoint(path):
            found[int(_STEP_DIR.match(name).group(1))] = path
        elif _ASIDE.match(name) and is_checkpoint(os.path.join(path, "checkpoint")):
            aside[int(_ASIDE.match(name).group(1)[len("step-"):])] = os.path.join(path, "checkpoint")
    found = {**aside, **found}
    return [found[step] for step in sorted(found)]


def latest(root: str) -> str | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def load(path: str, config: PaLMConfig | None = None, mesh=None, with_optimizer: bool = True,
         device: str = "cpu", precision: str = "fp32", weights: str = "fp32") -> Checkpoint:
    """Load a checkpoint directory (or the newest complete one under a run's checkpoints
    folder). With ``config``, the checkpoint must have been written for that configuration.
    With ``mesh``, the model is laid out on it (whatever mesh wrote the checkpoint); it lives on
    ``device`` and computes in ``precision`` with ``weights`` (PaLM.set_weights; checkpoints
    hold float32 weights whatever device, precision and weights wrote them). A damaged
    or mismatched checkpoint raises ValueError naming the file and the problem, before any
    model is built."""
    if not os.path.exists(os.path.join(path, "model.safetensors")) and latest(path):
        path = latest(path)
    for name in _REQUIRED:
        if not os.path.exists(os.path.join(path, name)):
            raise ValueError(f"{path} is not a palmcore checkpoint: {name} is missing")
    saved = _read_config(os.path.join(path, "config.json"))
    if config is not None and config != saved:
        different = [k for k, v in config.to_dict().items() if saved.to_dict()[k] != v]
        raise ValueError(f"checkpoint {path} is for another configuration (differs in "
                         f"{', '.join(different)})")
    tensors, _ = load_file(os.path.join(path, "model.safetensors"))
    _check_tensors_match(os.path.join(path, "model.safetensors"), tensors, saved)
    trainer = read_json_object(os.path.join(path, "trainer.json"))
    opt_path = os.path.join(path, "optimizer.safetensors")
    optimizer_state = _read_optimizer(opt_path, saved) if with_optimizer and os.path.exists(opt_path) else None
    model = PaLM(saved, seed=0, mesh=mesh, device=device, precision=precision)
    model.load_state_dict(tensors)
    model.set_weights(weights)  # after the load: compacted once
    return Checkpoint(path, model, optimizer_state, trainer)


def _check_tensors_match(path: str, tensors: dict, config: PaLMConfig) -> None:
    """The weights file holds exactly the tensors config.json implies (counted first, so that
    an absurd config is refused before anything proportional to it is built)."""
    expected_count = 2 + 8 * config.n_layers + config.n_sparse_layers  # a sparse layer: + its router
    if len(tensors) != expected_count:
        raise ValueError(f"{path} holds {len(tensors)} tensors, but config.json (n_layers="
                         f"{config.n_layers}) implies {expected_count}: the checkpoint is damaged or "
                         "its files do not belong together")
    shapes = config.param_shapes()
    missing = [n for n in shapes if n not in tensors]
    unexpected = [n for n in tensors if n not in shapes]
    if missing or unexpected:
        raise ValueError(f"{path} does not match config.json: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{path}: tensor '{name}' has shape {tuple(tensors[name].shape)}, but "
                             f"config.json implies {shape}")


def _read_optimizer(path: str, config: PaLMConfig) -> dict:
    tensors, meta = load_file(path)
    names = list(config.param_shapes())
    missing = [n for n in names if f"m.{n}" not in tensors or f"v.{n}" not in tensors]
    if missing or len(tensors) != 2 * len(names):
        raise ValueError(f"{path} does not match the model's parameters")
    try:
        settings = json.loads(meta.get("settings", "{}"))
        steps = int(meta.get("steps_taken", 0))
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path}: damaged metadata ({e})") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: damaged metadata (settings is not a JSON object)")
    return {"kind": meta.get("kind"), "settings": settings, "steps_taken": steps,
            "m": {n: tensors[f"m.{n}"] for n in names}, "v": {n: tensors[f"v.{n}"] for n in names}}


def _read_config(path: str) -> PaLMConfig:
    fields = read_json_object(path)
    required = [f.name for f in dataclasses.fields(PaLMConfig) if f.default is dataclasses.MISSING]
    missing = [name for name in required if name not in fields]
    if missing:
        raise ValueError(f"{path} is damaged: it has no {', '.join(missing)}")
    try:
        return PaLMConfig.from_dict(fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} is damaged: {e}") from None


def _write_json(path: str, value: dict) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2, default=_json_default)
        f.flush()
        os.fsync(f.fileno())


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
