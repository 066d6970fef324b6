"""safetensors files and checkpoint directories: exact round trips, atomic writes, resume,
and clear errors for truncated, corrupt, mistyped or mismatched files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import palmcore
from palmcore import checkpoint
from palmcore.tensorfile import load_file, save_file

from helpers import random_tokens

CFG = palmcore.PaLMConfig(vocab_size=37, d_model=12, n_layers=2, n_heads=4, head_dim=4, ffn_dim=20,
                          max_seq_len=16)


def trained(steps=2, seed=0):
    model = palmcore.PaLM(CFG, seed=seed)
    opt = palmcore.Adafactor(model)
    for step in range(steps):
        tokens = random_tokens(CFG, 2, 9, step)
        model.zero_grad()
        model.forward_backward(tokens[:, :-1], tokens[:, 1:])
        opt.step(1e-2)
    return model, opt


def test_safetensors_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 5)).astype(np.float32), "b": np.arange(7, dtype=np.int64),
               "c": rng.standard_normal(()).astype(np.float64), "empty": np.zeros((0, 4), np.float32)}
    path = str(tmp_path / "t.safetensors")
    save_file(tensors, path, {"note": "hi"})
    back, meta = load_file(path)
    assert meta == {"note": "hi"}
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value)
    # the layout other readers expect: u64 header length, JSON header, 8-byte aligned data
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0 and json.loads(raw[8:8 + n])["a"] == {"dtype": "F32", "shape": [3, 5],
                                                              "data_offsets": [0, 60]}


@pytest.mark.parametrize("damage,match", [
    (lambda raw: raw[:5], r"truncated \(5 bytes"),
    (lambda raw: raw[:-4], r"truncated \(tensor 'b' ends at byte"),
    (lambda raw: raw[:8] + b"{not json" + raw[17:], r"corrupt header"),
    (lambda raw: (10**9).to_bytes(8, "little") + raw[8:], r"truncated or corrupt \(header of"),
    (lambda raw: raw + b"xxxx", r"4 bytes after the last tensor"),
])
def test_safetensors_damage_is_named(tmp_path, damage, match):
    path = str(tmp_path / "t.safetensors")
    save_file({"a": np.ones(3, np.float32), "b": np.ones(4, np.float32)}, path)
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(damage(raw))
    with pytest.raises(ValueError, match=match):
        load_file(path)


def test_checkpoint_round_trip_and_resume(tmp_path):
    """N steps straight == N/2 steps, checkpoint, load, N/2 more (bit for bit)."""
    straight, _ = trained(steps=4)
    model, opt = trained(steps=2)
    path = checkpoint.save(str(tmp_path), model, opt, trainer={"data_position": 2})
    assert os.path.basename(path) == "step-00000002"
    ck = checkpoint.load(str(tmp_path))
    assert ck.trainer == {"data_position": 2, "step": 2} and ck.model.config == CFG
    for name, value in model.state_dict().items():
        assert np.array_equal(ck.model.state_dict()[name], value)
    opt2 = palmcore.Adafactor(ck.model)
    opt2.load_state_dict(ck.optimizer_state)
    for step in (2, 3):
        tokens = random_tokens(CFG, 2, 9, step)
        ck.model.zero_grad()
        ck.model.forward_backward(tokens[:, :-1], tokens[:, 1:])
        opt2.step(1e-2)
    for name, value in straight.state_dict().items():
        assert np.array_equal(ck.model.state_dict()[name], value), name


def test_keeps_the_newest_and_survives_a_crash_mid_write(tmp_path, monkeypatch):
    model, opt = trained(steps=1)
    for step in range(1, 6):
        checkpoint.save(str(tmp_path), model, opt, step=step, keep=3)
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(str(tmp_path))] == \
        ["step-00000003", "step-00000004", "step-00000005"]

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(checkpoint, "_write_json", crash)  # dies after the weights are written
    with pytest.raises(OSError, match="simulated"):
        checkpoint.save(str(tmp_path), model, opt, step=6, keep=3)
    assert checkpoint.latest(str(tmp_path)).endswith("step-00000005")
    assert sorted(os.listdir(tmp_path)) == ["step-00000003", "step-00000004", "step-00000005"]
    monkeypatch.undo()
    checkpoint.load(str(tmp_path))  # the newest complete one still loads


def test_mismatched_config_wrong_dtype_and_missing_files(tmp_path):
    model, opt = trained(steps=1)
    path = checkpoint.save(str(tmp_path), model, opt)
    other = palmcore.PaLMConfig(**{**CFG.to_dict(), "n_layers": 3})
    with pytest.raises(ValueError, match=r"is for another configuration \(differs in n_layers\)"):
        checkpoint.load(path, config=other)
    weights = os.path.join(path, "model.safetensors")
    tensors, meta = load_file(weights)
    save_file({k: v.astype(np.float64) for k, v in tensors.items()}, weights, meta)
    with pytest.raises(TypeError, match=r"parameter 'embed' must be a float32 ndarray, got float64"):
        checkpoint.load(path)
    tensors["final_norm.bogus"] = tensors.pop("final_norm.scale")
    save_file(tensors, weights, meta)
    with pytest.raises(ValueError, match=r"does not match config.json: missing \['final_norm.scale'\], "
                                         r"unexpected \['final_norm.bogus'\]"):
        checkpoint.load(path)
    del tensors["final_norm.bogus"]
    save_file(tensors, weights, meta)
    with pytest.raises(ValueError, match=r"holds 17 tensors, but config.json \(n_layers=2\) implies 18"):
        checkpoint.load(path)
    os.unlink(os.path.join(path, "config.json"))
    with pytest.raises(ValueError, match=r"is not a palmcore checkpoint: config.json is missing"):
        checkpoint.load(path)


# ----------------------------------------------------------------- nothing lost (issue 9)

def killed_while_moving_in(monkeypatch, save):
    """save() as if the process died between moving the old folder aside and renaming the new
    one in (the rename of the .tmp-step-* folder fails)."""
    real_rename = os.rename

    def crash_on_moving_in(src, dst):
        if os.path.basename(src).startswith(".tmp-step-"):
            raise OSError("killed (simulated)")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", crash_on_moving_in)
    with pytest.raises(OSError, match="simulated"):
        save()
    monkeypatch.undo()


def _names(root):
    return sorted(os.listdir(root))


def test_a_crash_while_re_saving_a_step_keeps_the_old_one(tmp_path, monkeypatch):
    """Re-saving step N renames the old step-N aside, moves the new one in, then deletes the
    old: a crash at any point leaves a complete step N (old or new) or puts it back."""
    model, opt = trained(steps=1)
    checkpoint.save(str(tmp_path), model, opt, step=1)
    first = checkpoint.save(str(tmp_path), model, opt, step=2)
    killed_while_moving_in(monkeypatch, lambda: checkpoint.save(str(tmp_path), model, opt, step=2))
    # the old step 2 was moved aside, not deleted, and readers still find it there
    aside = [n for n in _names(tmp_path) if n.startswith(".old-step-00000002-")]
    assert len(aside) == 1
    assert checkpoint.latest(str(tmp_path)) == os.path.join(tmp_path, aside[0], "checkpoint")
    assert checkpoint.load(str(tmp_path)).trainer["step"] == 2
    # the next save puts the old step 2 back before anything else
    checkpoint.save(str(tmp_path), model, opt, step=3)
    assert _names(tmp_path) == ["step-00000001", "step-00000002", "step-00000003"]
    assert checkpoint.is_checkpoint(first)


def test_a_half_deleted_folder_is_never_picked(tmp_path):
    model, opt = trained(steps=1)
    checkpoint.save(str(tmp_path), model, opt, step=1)
    newest = checkpoint.save(str(tmp_path), model, opt, step=2)
    os.unlink(os.path.join(newest, "model.safetensors"))  # what the old re-save left after a crash
    assert checkpoint.latest(str(tmp_path)).endswith("step-00000001")
    ck = checkpoint.load(str(tmp_path))
    assert ck.path.endswith("step-00000001")
    os.unlink(os.path.join(ck.path, checkpoint.MARKER))   # no marker: not complete either
    assert checkpoint.latest(str(tmp_path)) is None


def test_stale_temporary_folders_are_removed(tmp_path):
    model, opt = trained(steps=1)
    for stale in (".tmp-step-abc", ".tmp-removed-step-00000001-x"):
        os.makedirs(tmp_path / stale / "junk")
    checkpoint.save(str(tmp_path), model, opt, step=1)
    assert _names(tmp_path) == ["step-00000001"]


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_files_follow_the_umask(tmp_path, mask):
    model, opt = trained(steps=1)
    old = os.umask(mask)
    try:
        path = checkpoint.save(str(tmp_path / "ck"), model, opt, step=1, tokenizer_path=None)
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o777 & ~mask
    for name in os.listdir(path):
        assert os.stat(os.path.join(path, name)).st_mode & 0o777 == 0o666 & ~mask, name


def test_an_absurd_config_is_refused_before_the_model_is_built(tmp_path):
    """config.json claiming 10^9 layers (a 100 KB checkpoint) is refused from the tensor count,
    quickly and without allocating anything for it."""
    model, opt = trained(steps=1)
    path = checkpoint.save(str(tmp_path), model, opt, step=1)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(config, n_layers=10**9), f)
    with pytest.raises(ValueError, match=r"holds 18 tensors, but config.json \(n_layers=1000000000\) "
                                         r"implies 8000000002"):
        checkpoint.load(path)


@pytest.mark.parametrize("name,content,match", [
    ("trainer.json", "[1, 2]", r"trainer.json is damaged: a JSON object was expected, got list"),
    ("trainer.json", "{", r"trainer.json is damaged: not valid JSON"),
    ("trainer.json", "[" * 100000 + "]" * 100000, r"trainer.json is damaged: not valid JSON \(RecursionError\)"),
    ("config.json", "\xff\xfe", r"config.json is damaged: not valid JSON"),
    ("config.json", "null", r"config.json is damaged: a JSON object was expected, got NoneType"),
])
def test_damaged_json_files_are_named(tmp_path, name, content, match):
    model, opt = trained(steps=1)
    path = checkpoint.save(str(tmp_path), model, opt, step=1)
    with open(os.path.join(path, name), "w", encoding="latin-1") as f:
        f.write(content)
    with pytest.raises(ValueError, match=match):
        checkpoint.load(path)


def test_damaged_optimizer_metadata_is_named(tmp_path):
    model, opt = trained(steps=1)
    path = checkpoint.save(str(tmp_path), model, opt, step=1)
    opt_path = os.path.join(path, "optimizer.safetensors")
    tensors, meta = load_file(opt_path)
    for bad in ({"settings": "{oops"}, {"steps_taken": "many"}, {"settings": "[1]"}):
        save_file(tensors, opt_path, {**meta, **bad})
        with pytest.raises(ValueError, match=r"optimizer.safetensors: damaged metadata"):
            checkpoint.load(path)


def test_the_only_checkpoint_stays_visible_through_a_killed_re_save(tmp_path, monkeypatch):
    model, opt = trained(steps=1)
    checkpoint.save(str(tmp_path), model, opt, step=0, keep=1)
    killed_while_moving_in(monkeypatch, lambda: checkpoint.save(str(tmp_path), model, opt, step=0, keep=1))
    assert checkpoint.latest(str(tmp_path)) is not None
    assert checkpoint.load(str(tmp_path)).trainer["step"] == 0
    checkpoint.save(str(tmp_path), model, opt, step=1, keep=1)   # tidies up and prunes the aside one
    assert _names(tmp_path) == ["step-00000001"]


def test_steps_beyond_eight_digits_are_listed_in_order(tmp_path):
    model, opt = trained(steps=1)
    for step in (99_999_999, 100_000_000, 7):
        checkpoint.save(str(tmp_path), model, opt, step=step, keep=5)
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(str(tmp_path))] == \
        ["step-00000007", "step-99999999", "step-100000000"]


def test_non_finite_weights_are_never_saved(tmp_path):
    """An update that overflows is reported after it, and such weights are never written."""
    model, opt = trained(steps=1)
    tokens = random_tokens(CFG, 2, 9, 5)
    model.zero_grad()
    model.forward_backward(tokens[:, :-1], tokens[:, 1:])
    with pytest.raises(palmcore._core.NonFiniteStep, match=r"the update made a parameter non-finite"):
        opt.step(1e30)
    with pytest.raises(ValueError, match=r"refusing to save a checkpoint whose parameters are not finite"):
        checkpoint.save(str(tmp_path), model, opt, step=2)
    assert checkpoint.latest(str(tmp_path)) is None
