"""The training loop on a tiny corpus: metrics, evaluation, exact resume, the loss-spike guard."""

from __future__ import annotations

import json
import math
import os
import re
import shlex

import numpy as np
import pytest

import palmcore
from palmcore import checkpoint
from palmcore.training import run

from helpers import tiny_run_settings as settings


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_trains_logs_and_evaluates(corpus, tmp_path):
    summary = run(settings(corpus, tmp_path, steps=12), log=lambda _: None)
    assert isinstance(summary["sample"], str) and summary["sample_prompt"]
    model, tok = palmcore.load(str(tmp_path))
    assert model.config.vocab_size == tok.vocab_size
    ids = tok.encode(summary["sample_prompt"])
    assert tok.decode(ids) == summary["sample_prompt"]
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert all({"step", "loss", "ce", "lr", "tokens_per_s"} <= set(r) for r in rows)
    assert [r["step"] for r in rows if "val_loss" in r] == [4, 8, 12]
    assert all(math.isfinite(r["val_bpb"]) and r["val_bpb"] > 0 for r in rows if "val_loss" in r)
    assert np.mean([r["loss"] for r in rows[-3:]]) < np.mean([r["loss"] for r in rows[:3]])
    assert os.path.exists(tmp_path / "tokenizer.model")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert checkpoint.latest(str(tmp_path / "checkpoints")).endswith("step-00000012")


def test_resume_continues_exactly(corpus, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(settings(corpus, straight), log=lambda _: None)
    run(settings(corpus, split, steps=4), log=lambda _: None)
    run(settings(corpus, split), resume=True, log=lambda _: None)
    assert [r["loss"] for r in metrics(straight)] == [r["loss"] for r in metrics(split)]
    a = checkpoint.load(str(straight / "checkpoints")).model.state_dict()
    b = checkpoint.load(str(split / "checkpoints")).model.state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_nan_loss_rolls_back_and_skips_the_batch(corpus, tmp_path, monkeypatch):
    real = palmcore.PaLM.forward_backward
    calls = {"n": 0}

    def poisoned(self, tokens, targets, total_tokens=None):
        out = real(self, tokens, targets, total_tokens)
        calls["n"] += 1
        if calls["n"] == 6:  # the 6th training call (step 6, after the step-4 checkpoint)
            out = dict(out, loss=float("nan"))
        return out

    monkeypatch.setattr(palmcore.PaLM, "forward_backward", poisoned)
    lines = []
    run(settings(corpus, tmp_path, eval_every=100), log=lines.append)
    assert any("rolled back to step 4, skipping data batch 5" in line for line in lines), lines
    trainer = checkpoint.load(str(tmp_path / "checkpoints")).trainer
    assert trainer["step"] == 8 and trainer["skipped"] == [5] and trainer["data_step"] == 9
    rows = metrics(tmp_path)
    assert [r for r in rows if "event" in r] == [
        {"event": "rollback", "at_step": 6, "to_step": 4, "skipped_batch": 5, "reason": "loss nan"}]
    steps = [(r["step"], r.get("replay", False)) for r in rows if "step" in r]
    assert steps == [(1, False), (2, False), (3, False), (4, False), (5, False),  # step 6 spiked
                     (5, True), (6, False), (7, False), (8, False)]             # 5 replayed
    assert all(math.isfinite(r["loss"]) for r in rows if "step" in r)


def test_cli_train_and_resume(corpus, tmp_path, capsys):
    from palmcore.cli import main

    common = ["train", "--corpus", corpus, "--vocab-size", "300", "--set", "d_model=32",
              "--set", "n_layers=1", "--set", "n_heads=2", "--batch-size", "2", "--seq-len", "16",
              "--eval-every", "3", "--out", str(tmp_path)]
    assert main(common + ["--steps", "3"]) == 0
    assert main(common + ["--steps", "6", "--resume"]) == 0
    assert [r["step"] for r in metrics(tmp_path)] == list(range(1, 7))
    assert "resumed from" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--corpus", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "matches no file" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--set takes key=value"):
        main(common + ["--set", "bogus=1"])


def test_ctrl_c_saves_and_resume_finishes(corpus, tmp_path, monkeypatch):
    real = palmcore.PaLM.forward_backward
    calls = {"n": 0}

    def interrupted(self, tokens, targets, total_tokens=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, tokens, targets, total_tokens)

    monkeypatch.setattr(palmcore.PaLM, "forward_backward", interrupted)
    lines = []
    run(settings(corpus, tmp_path, eval_every=100), log=lines.append)
    assert any("interrupted at step 2: saving a checkpoint" in line for line in lines)
    assert checkpoint.latest(str(tmp_path / "checkpoints")).endswith("step-00000002")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # plotted at an interrupt too
    monkeypatch.undo()
    run(settings(corpus, tmp_path, eval_every=100), resume=True, log=lambda _: None)
    assert [r["step"] for r in metrics(tmp_path)] == list(range(1, 9))


def test_micro_batches_match_one_batch(corpus, tmp_path):
    run(settings(corpus, tmp_path / "one", batch_size=4, steps=3), log=lambda _: None)
    run(settings(corpus, tmp_path / "two", batch_size=4, accumulate=2, steps=3), log=lambda _: None)
    for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    with pytest.raises(ValueError, match=r"accumulate \(3\) x the data axis \(1\) must divide batch_size \(4\)"):
        run(settings(corpus, tmp_path / "bad", batch_size=4, accumulate=3), log=lambda _: None)
    with pytest.raises(ValueError, match=r"x the data axis \(2\) must divide batch_size \(3\)"):
        run(settings(corpus, tmp_path / "bad2", batch_size=3, mesh="data=2"), log=lambda _: None)


def test_resume_refuses_other_settings_and_time_budget_evaluates(corpus, tmp_path):
    run(settings(corpus, tmp_path, steps=2), log=lambda _: None)
    with pytest.raises(ValueError, match=r"cannot resume .*step-00000002: --seed 1 given, the run has 0"):
        run(settings(corpus, tmp_path, steps=4, seed=1), resume=True, log=lambda _: None)
    lines = []
    summary = run(settings(corpus, tmp_path / "budget", steps=50, eval_every=100, time_budget=0.0),
                  log=lines.append)
    assert "loss" not in summary and any("time budget" in line for line in lines)


def test_a_resume_takes_the_runs_settings_from_its_checkpoint(corpus, tmp_path, capsys, monkeypatch):
    """--resume used to need every original flag again (else it trained on the defaults:
    another corpus, shape or optimizer), and refused naming fields without values. Now the
    interrupted run prints the exact command that continues it, that command alone gives the
    straight run's losses, and a flag given again that disagrees is refused with both values."""
    from palmcore.cli import main

    common = ["train", "--corpus", corpus, "--vocab-size", "300", "--set", "d_model=16", "--set", "n_layers=1",
              "--set", "n_heads=2", "--batch-size", "2", "--seq-len", "8", "--eval-every", "2", "--optimizer",
              "adamw", "--lr", "0.003", "--seed", "5", "--steps", "6"]
    assert main(common + ["--out", str(tmp_path / "straight")]) == 0
    real, calls = palmcore.PaLM.forward_backward, {"n": 0}

    def interrupted(self, tokens, targets, total_tokens=None):
        calls["n"] += total_tokens is not None        # training calls pass the total (evaluation does not)
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, tokens, targets, total_tokens)

    monkeypatch.setattr(palmcore.PaLM, "forward_backward", interrupted)
    assert main(common + ["--out", str(tmp_path / "split")]) == 130
    monkeypatch.undo()
    out = capsys.readouterr().out
    assert "trained to step 3 " in out and "stopped by the interrupt" in out
    resume = re.search(r"^resume: +(.*)$", out, re.M).group(1)
    assert resume == f"palmcore train --resume --out {tmp_path / 'split'}"
    assert main(shlex.split(resume)[1:]) == 0
    out = capsys.readouterr().out
    assert re.search(r"trained to step 6 \(96 tokens\) in \d+m \d+s \(the whole run; \d+m \d+s since resuming at "
                     r"step 3\)\n", out), out
    assert "resume:" not in out
    assert [(r["step"], r["loss"]) for r in metrics(tmp_path / "split")] == \
        [(r["step"], r["loss"]) for r in metrics(tmp_path / "straight")]
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--resume", "--out", str(tmp_path / "split"), "--seq-len", "16", "--optimizer", "adafactor",
              "--set", "n_layers=2", "--steps", "8"])
    assert exit_info.value.code == 2
    assert (f"palmcore train: error: cannot resume {tmp_path / 'split'}: --seq-len 16 given, the run has 8; "
            "--optimizer adafactor given, the run has adamw; --set n_layers=2 given, the run has n_layers=1 "
            "(leave a setting out to take the run's)") in capsys.readouterr().err


def test_the_default_run_evaluates_often_enough_for_a_curve(tmp_path):
    """The default run (no corpus) evaluated every 100 steps: one point in its ~540 steps (~1 s a
    step on a 2-core machine); it gets at least ten."""
    from palmcore import training

    s = training.settings(out=str(tmp_path / "run"))
    assert s.corpus is None and s.time_budget == training.DEFAULT_RUN_SECONDS
    assert training.DEFAULT_RUN_SECONDS / s.eval_every >= 10
