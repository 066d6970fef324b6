"""Checkpoints: one directory per step under a run's folder, written atomically.

    <root>/step-00000120/
        model.safetensors       every parameter by its spec name (float32)
        config.json             the PaLMConfig
        optimizer.safetensors   m.<name>, v.<name>; kind, settings and steps_taken as metadata
        trainer.json            whatever the training loop needs to resume (step, RNG, data, ...)
        tokenizer.model         the SentencePiece model, when the run has one

A checkpoint is built in a hidden temporary directory and renamed into place, so a crash at
any moment leaves the earlier checkpoints intact and no half-written one visible. Only the
newest ``keep`` are kept.
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
from palmcore.model import PaLM
from palmcore.tensorfile import load_file, save_file

_STEP_DIR = re.compile(r"^step-(\d{8})$")
FORMAT = "palmcore-checkpoint/1"


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
    state = optimizer.state_dict() if optimizer is not None else None
    mesh = model.mesh
    if mesh is not None and not mesh.is_main:
        mesh.barrier()  # until the main rank has written it
        return final
    try:
        _write(root, final, model, weights, state, trainer, step, tokenizer_path)
    finally:
        if mesh is not None:
            mesh.barrier()
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write(root, final, model, weights, state, trainer, step, tokenizer_path) -> None:
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=root, prefix=".tmp-step-")
    try:
        save_file(weights, os.path.join(tmp, "model.safetensors"), {"format": FORMAT})
        _write_json(os.path.join(tmp, "config.json"), model.config.to_dict())
        if state is not None:
            tensors = {f"m.{n}": a for n, a in state["m"].items()}
            tensors.update({f"v.{n}": a for n, a in state["v"].items()})
            save_file(tensors, os.path.join(tmp, "optimizer.safetensors"),
                      {"format": FORMAT, "kind": state["kind"], "steps_taken": state["steps_taken"],
                       "settings": json.dumps(state["settings"])})
        _write_json(os.path.join(tmp, "trainer.json"), dict(trainer or {}, step=step))
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, os.path.join(tmp, "tokenizer.model"))
        _fsync_dir(tmp)
        if os.path.exists(final):  # re-saving a step: move the old one aside first
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def list_checkpoints(root: str) -> list[str]:
    """The complete checkpoints under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if _STEP_DIR.match(n))
    return [os.path.join(root, n) for n in names]


def latest(root: str) -> str | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def load(path: str, config: PaLMConfig | None = None, mesh=None) -> Checkpoint:
    """Load a checkpoint directory (or the newest one under a run folder). With ``config``,
    the checkpoint must have been written for that configuration. With ``mesh``, the model
    is laid out on it (whatever mesh wrote the checkpoint)."""
    if not os.path.exists(os.path.join(path, "model.safetensors")) and latest(path):
        path = latest(path)
    for name in ("model.safetensors", "config.json", "trainer.json"):
        if not os.path.exists(os.path.join(path, name)):
            raise ValueError(f"{path} is not a palmcore checkpoint: {name} is missing")
    with open(os.path.join(path, "config.json")) as f:
        saved = PaLMConfig.from_dict(json.load(f))
    if config is not None and config != saved:
        different = [k for k, v in config.to_dict().items() if saved.to_dict()[k] != v]
        raise ValueError(f"checkpoint {path} is for another configuration (differs in "
                         f"{', '.join(different)})")
    tensors, _ = load_file(os.path.join(path, "model.safetensors"))
    model = PaLM(saved, seed=0, mesh=mesh)
    model.load_state_dict(tensors)
    with open(os.path.join(path, "trainer.json")) as f:
        trainer = json.load(f)
    optimizer_state = None
    opt_path = os.path.join(path, "optimizer.safetensors")
    if os.path.exists(opt_path):
        tensors, meta = load_file(opt_path)
        names = model.state_dict_names()
        missing = [n for n in names if f"m.{n}" not in tensors or f"v.{n}" not in tensors]
        if missing or len(tensors) != 2 * len(names):
            raise ValueError(f"{opt_path} does not match the model's parameters")
        optimizer_state = {"kind": meta.get("kind"), "settings": json.loads(meta.get("settings", "{}")),
                           "steps_taken": int(meta.get("steps_taken", 0)),
                           "m": {n: tensors[f"m.{n}"] for n in names},
                           "v": {n: tensors[f"v.{n}"] for n in names}}
    return Checkpoint(path, model, optimizer_state, trainer)


def load_pretrained(path: str):
    """(model, tokenizer) from a run folder, its checkpoints folder or one checkpoint."""
    from palmcore.tokenizer import Tokenizer  # noqa: PLC0415

    for candidate in (path, os.path.join(path, "checkpoints")):
        if os.path.exists(os.path.join(candidate, "model.safetensors")) or latest(candidate):
            ck = load(candidate)
            tok_path = os.path.join(ck.path, "tokenizer.model")
            if not os.path.exists(tok_path):
                raise ValueError(f"checkpoint {ck.path} holds no tokenizer.model")
            return ck.model, Tokenizer(tok_path)
    raise ValueError(f"no palmcore checkpoint in {path}")


def _write_json(path: str, value: dict) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2, default=_json_default)
        f.flush()
        os.fsync(f.fileno())


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
