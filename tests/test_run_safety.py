"""Nothing lost, nothing confusing (issue 9): atomic steps under interrupts, bounded rollbacks,
one run per folder, checked settings, an append-only metrics log, corpora that are awkward."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import palmcore
from palmcore import checkpoint
from palmcore.runlock import RunFolderInUse, RunLock
from palmcore.training import TrainingDiverged, run

from helpers import tiny_run_settings as settings


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights_bytes(out):
    with open(os.path.join(checkpoint.latest(os.path.join(out, "checkpoints")), "model.safetensors"), "rb") as f:
        return f.read()


def quiet(_):
    pass


# ------------------------------------------------------------------ 1. a step is atomic

def test_an_interrupt_right_after_the_update_does_not_apply_it_twice(corpus, tmp_path, monkeypatch):
    """SIGINT arriving just after the C++ update (before the loop's bookkeeping) used to save
    the updated weights under the old step number, so --resume applied that step again."""
    run(settings(corpus, tmp_path / "straight"), log=quiet)
    real = palmcore.Adafactor.step
    calls = {"n": 0}

    def step_then_sigint(self, *args, **kwargs):
        norm = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return norm

    monkeypatch.setattr(palmcore.Adafactor, "step", step_then_sigint)
    lines = []
    summary = run(settings(corpus, tmp_path / "split"), log=lines.append)
    assert summary["stopped_by"] == "interrupt" and summary["steps"] == 3, lines
    assert checkpoint.latest(str(tmp_path / "split" / "checkpoints")).endswith("step-00000003")
    monkeypatch.undo()
    run(settings(corpus, tmp_path / "split"), resume=True, log=quiet)
    assert weights_bytes(tmp_path / "split") == weights_bytes(tmp_path / "straight")
    assert [r["step"] for r in metrics(tmp_path / "split")] == list(range(1, 9))


RANDOM_INTERRUPTS = 6


def test_random_interrupts_then_resumes_equal_a_straight_run(corpus, tmp_path):
    """`palmcore train` interrupted by SIGINT at random moments, resumed each time: the final
    weights equal a straight run's, byte for byte."""
    common = ["-m", "palmcore", "train", "--corpus", corpus, "--vocab-size", "300", "--set", "d_model=64",
              "--set", "n_layers=2", "--set", "n_heads=2", "--batch-size", "4", "--seq-len", "32",
              "--steps", "800", "--eval-every", "7", "--threads", "1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    straight = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "straight")], env=env,
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr
    out = str(tmp_path / "interrupted")
    rng = np.random.default_rng(1234)
    interrupted_in_loop = 0
    for attempt in range(RANDOM_INTERRUPTS + 1):
        proc = subprocess.Popen([sys.executable, *common, "--out", out, "--resume"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if attempt < RANDOM_INTERRUPTS:
            time.sleep(float(rng.uniform(1.0, 2.5)))
            proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode in (0, 130), stderr      # finished, or stopped by the interrupt
        assert "Traceback" not in stderr, stderr
        interrupted_in_loop += "stopping at step" in stderr + stdout
    assert checkpoint.load(os.path.join(out, "checkpoints")).trainer["step"] == 800
    assert weights_bytes(out) == weights_bytes(tmp_path / "straight")
    assert interrupted_in_loop >= RANDOM_INTERRUPTS // 2, "no interrupt landed in the training loop: the test proved nothing"


# ------------------------------------------------------------------ 3. divergence is bounded

def test_a_diverging_run_stops_with_a_clear_error(corpus, tmp_path):
    lines = []
    with pytest.raises(TrainingDiverged, match=r"training diverged: 6 loss spikes in a row since the last "
                                               r"checkpoint .*Lower the learning rate \(now 1e\+30; --lr\)"):
        run(settings(corpus, tmp_path, lr=1e30, steps=1000), log=lines.append)
    assert sum("rolled back" in line for line in lines) == 5          # max_rollbacks
    assert checkpoint.latest(str(tmp_path / "checkpoints")).endswith("step-00000000")  # intact


def test_an_overflowing_update_rolls_back_instead_of_saving_infinite_weights(corpus, tmp_path):
    """--lr 1e30 with a checkpoint after every step: the first update overflows the weights;
    that is a spike (rolled back), never a checkpoint that cannot be loaded again."""
    lines = []
    with pytest.raises(TrainingDiverged, match=r"the update made a parameter non-finite"):
        run(settings(corpus, tmp_path, lr=1e30, steps=50, checkpoint_every=1, eval_every=1), log=lines.append)
    for path in checkpoint.list_checkpoints(str(tmp_path / "checkpoints")):
        checkpoint.load(path)                                  # every checkpoint written loads
    palmcore.load(str(tmp_path))


def test_other_runtime_errors_are_not_spikes(corpus, tmp_path, monkeypatch):
    """Only a non-finite step rolls back; any other failure of the step (a device error, say)
    ends the run with that error instead of five rollbacks and advice about the learning rate."""
    def broken(self, *args, **kwargs):
        raise RuntimeError("cublasLtMatmul: an execution failure (simulated)")

    monkeypatch.setattr(palmcore.Adafactor, "step", broken)
    with pytest.raises(RuntimeError, match=r"simulated") as info:
        run(settings(corpus, tmp_path), log=quiet)
    assert not isinstance(info.value, TrainingDiverged)


def test_the_cli_names_divergence_and_exits(corpus, tmp_path, capsys):
    from palmcore.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--corpus", corpus, "--vocab-size", "300", "--set", "d_model=16", "--set", "n_layers=1",
              "--set", "n_heads=2", "--batch-size", "2", "--seq-len", "8", "--lr", "1e30", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "palmcore train: error: training diverged" in capsys.readouterr().err


# ------------------------------------------------------------------ 4. one run per folder

def test_a_second_run_on_the_same_folder_is_refused(corpus, tmp_path):
    os.makedirs(tmp_path)  if not os.path.exists(tmp_path) else None
    with RunLock(str(tmp_path)):
        with pytest.raises(RunFolderInUse, match=rf"{re.escape(str(tmp_path))} is in use by another palmcore "
                                                 rf"run \(pid {os.getpid()}\)"):
            run(settings(corpus, tmp_path), log=quiet)
    assert not os.path.exists(tmp_path / "metrics.jsonl")
    run(settings(corpus, tmp_path, steps=2), log=quiet)     # released: the folder is usable


def test_a_second_run_into_a_folder_that_holds_one_is_refused(corpus, tmp_path, capsys, monkeypatch):
    """A second `palmcore train` without --resume used to mix two runs: the old run's higher
    step stayed `latest` and the new steps were appended to its metrics.jsonl as replays."""
    from palmcore.cli import main

    common = ["train", "--corpus", corpus, "--vocab-size", "300", "--set", "d_model=16", "--set", "n_layers=1",
              "--set", "n_heads=2", "--batch-size", "2", "--seq-len", "8", "--eval-every", "2"]
    assert main(common + ["--steps", "4", "--out", str(tmp_path / "run")]) == 0
    before = (tmp_path / "run" / "metrics.jsonl").read_text(), weights_bytes(tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        main(common + ["--steps", "2", "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert (f"palmcore train: error: {tmp_path / 'run'} already holds a run (checkpoints up to step-00000004): "
            "`palmcore train --resume` (resume=True) continues it, `--force` (force=True) replaces it, or choose "
            "another --out") in capsys.readouterr().err
    assert ((tmp_path / "run" / "metrics.jsonl").read_text(), weights_bytes(tmp_path / "run")) == before
    assert main(common + ["--steps", "2", "--out", str(tmp_path / "run"), "--force"]) == 0
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2]          # the new run alone
    assert checkpoint.latest(str(tmp_path / "run" / "checkpoints")).endswith("step-00000002")
    assert sorted(os.listdir(tmp_path / "run")) == [".lock", "checkpoints", "data", "loss.png", "metrics.jsonl",
                                                   "tokenizer.model", "tokenizer.vocab"]
    # the default job (`palmcore` alone) a second time: the same message, nothing trained
    monkeypatch.chdir(tmp_path)
    assert main(common + ["--steps", "2", "--out", "runs/default"]) == 0
    with pytest.raises(SystemExit):
        main([])
    assert "runs/default already holds a run (checkpoints up to step-00000002): `palmcore train --resume`" \
        in capsys.readouterr().err


def test_a_replacement_that_fails_or_crashes_leaves_a_whole_run(corpus, tmp_path):
    """--force keeps the old run until the new one has its first checkpoint: a new run that
    fails before that puts it back; a crash at either side of that point is repaired by the
    next start in the folder (the old run back, or the new one kept)."""
    from palmcore import runfolder

    out = tmp_path / "run"
    run(settings(corpus, out, steps=4), log=quiet)
    before = sorted(os.listdir(out)), (out / "metrics.jsonl").read_text(), weights_bytes(out)
    with pytest.raises(ValueError, match="matches no file"):                  # fails while starting
        run(settings(str(tmp_path / "nothing-here"), out), force=True, log=quiet)
    assert (sorted(os.listdir(out)), (out / "metrics.jsonl").read_text(), weights_bytes(out)) == before
    runfolder.Replacement(str(out)).__enter__()                              # killed after moving aside
    assert runfolder.run_entries(str(out)) == []
    summary = run(settings(corpus, out, steps=6), resume=True, log=quiet)     # the old run is back
    assert summary["steps"] == 6 and [r["step"] for r in metrics(out)] == list(range(1, 7))
    run(settings(corpus, tmp_path / "new", steps=2), log=quiet)
    runfolder.Replacement(str(out)).__enter__()                              # killed after the new start
    shutil.copytree(tmp_path / "new" / "checkpoints", out / "checkpoints")
    run(settings(corpus, out, steps=3), resume=True, log=quiet)
    assert checkpoint.load(str(out / "checkpoints")).trainer["step"] == 3 and not os.path.exists(out / ".replaced-run")


def test_the_lock_dies_with_its_process(corpus, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom palmcore.runlock import RunLock\n"
                               f"with RunLock({str(tmp_path)!r}):\n    print('locked', flush=True)\n"
                               "    time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderInUse, match=rf"\(pid {holder.pid}\)"):
            run(settings(corpus, tmp_path), log=quiet)
    finally:
        holder.kill()
        holder.wait()
    run(settings(corpus, tmp_path, steps=2), log=quiet)     # kill -9 left no stale lock


# ------------------------------------------------------------------ 6, 10. settings are checked

@pytest.mark.parametrize("change,error,match", [
    (dict(time_budget=-1.0), ValueError, r"time_budget must be finite and >= 0, got -1.0"),
    (dict(time_budget=float("nan")), ValueError, r"time_budget must be finite and >= 0, got nan"),
    (dict(time_budget=float("inf")), ValueError, r"time_budget must be finite and >= 0, got inf"),
    (dict(lr=-1e-3), ValueError, r"lr must be finite and >= 0"),
    (dict(lr=float("nan")), ValueError, r"lr must be finite and >= 0"),
    (dict(batch_size=0), ValueError, r"batch_size must be >= 1, got 0"),
    (dict(steps=2.5), TypeError, r"steps must be an integer, got 2.5"),
    (dict(seed=2**64), ValueError, r"seed must be in \[0, 18446744073709551615\]"),
    (dict(optimizer="sgd"), ValueError, r"optimizer must be 'adafactor' or 'adamw'"),
    (dict(batch_size=10**9), ValueError, r"out of memory: a batch of 1000000000 x 17 tokens needs"),
    (dict(seq_len=32, overrides=dict(d_model=32, n_layers=1, n_heads=2, max_seq_len=16)), ValueError,
     r"seq_len 32 does not fit the max_seq_len 16 that was set explicitly"),
])
def test_bad_settings_are_refused_before_anything_is_written(corpus, tmp_path, change, error, match):
    with pytest.raises(error, match=match):
        run(settings(corpus, tmp_path / "run", **change), log=quiet)
    assert not os.path.exists(tmp_path / "run")


def test_lr_zero_means_zero(corpus, tmp_path):
    """--lr 0 used to train at the default 1e-2 (`lr or default`)."""
    run(settings(corpus, tmp_path, lr=0.0, steps=3), log=quiet)
    first = checkpoint.load(checkpoint.list_checkpoints(str(tmp_path / "checkpoints"))[0]).model.state_dict()
    last = checkpoint.load(str(tmp_path / "checkpoints")).model.state_dict()
    assert all(np.array_equal(first[k], last[k]) for k in first)
    assert {r["lr"] for r in metrics(tmp_path)} == {0.0}


def test_out_pointing_at_a_file_is_refused(corpus, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match=r"the output folder .*a-file is a file"):
        run(settings(corpus, tmp_path / "a-file"), log=quiet)
    from palmcore.cli import main

    with pytest.raises(SystemExit) as exit_info:      # a folder inside a file: no traceback either
        main(["train", "--corpus", corpus, "--out", str(tmp_path / "a-file" / "run")])
    assert exit_info.value.code == 2
    assert "palmcore train: error: Not a directory" in capsys.readouterr().err


def test_a_damaged_trainer_json_is_named_on_resume(corpus, tmp_path):
    run(settings(corpus, tmp_path, steps=2), log=quiet)
    path = os.path.join(checkpoint.latest(str(tmp_path / "checkpoints")), "trainer.json")
    with open(path) as f:
        trainer = json.load(f)
    for damage, match in [({"step": "two"}, r"'step' is 'two'"), ({"skipped": {"a": 1}}, r"'skipped' is"),
                          ({"settings": None}, r"'settings' is None"), ({"step": 10**300}, r"'step' is 1000")]:
        with open(path, "w") as f:
            json.dump({**trainer, **damage}, f)
        with pytest.raises(ValueError, match=rf"trainer.json is damaged: {match}"):
            run(settings(corpus, tmp_path, steps=4), resume=True, log=quiet)


# ------------------------------------------------------------------ 7. metrics are append-only

def test_an_interrupted_evaluation_keeps_every_earlier_line(corpus, tmp_path, monkeypatch):
    real = palmcore.PaLM.forward_backward

    def sigint_in_evaluation(self, tokens, targets, total_tokens=None):
        if total_tokens is None:  # evaluation calls pass no total (training always does)
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, tokens, targets, total_tokens)

    run(settings(corpus, tmp_path, steps=3, eval_every=100), log=quiet)
    before = (tmp_path / "metrics.jsonl").read_text()
    monkeypatch.setattr(palmcore.PaLM, "forward_backward", sigint_in_evaluation)
    summary = run(settings(corpus, tmp_path, steps=8, eval_every=4), resume=True, log=quiet)
    monkeypatch.undo()
    after = (tmp_path / "metrics.jsonl").read_text()
    assert after.startswith(before)                                    # nothing rewritten
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert "val_loss" not in rows[-1] and summary["steps"] == 4 and summary["stopped_by"] == "interrupt"


def test_an_interrupt_during_the_last_evaluation_stops_the_run(corpus, tmp_path, monkeypatch):
    real = palmcore.PaLM.forward_backward

    def sigint_in_evaluation(self, tokens, targets, total_tokens=None):
        if total_tokens is None:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, tokens, targets, total_tokens)

    monkeypatch.setattr(palmcore.PaLM, "forward_backward", sigint_in_evaluation)
    summary = run(settings(corpus, tmp_path, steps=4, eval_every=4), log=quiet)
    assert summary["stopped_by"] == "interrupt" and summary["steps"] == 4 and "sample" not in summary
    assert checkpoint.latest(str(tmp_path / "checkpoints")).endswith("step-00000004")


def test_a_huge_skipped_list_resumes_quickly(corpus, tmp_path):
    """A (tampered) trainer.json with many skipped batches: skipping is a set lookup."""
    run(settings(corpus, tmp_path, steps=2), log=quiet)
    path = os.path.join(checkpoint.latest(str(tmp_path / "checkpoints")), "trainer.json")
    with open(path) as f:
        trainer = json.load(f)
    with open(path, "w") as f:
        json.dump({**trainer, "skipped": list(range(trainer["data_step"], trainer["data_step"] + 200_000))}, f)
    run(settings(corpus, tmp_path, steps=3), resume=True, log=quiet)
    assert checkpoint.load(str(tmp_path / "checkpoints")).trainer["data_step"] == trainer["data_step"] + 200_001


def test_replayed_steps_are_marked(corpus, tmp_path):
    """kill -9 between checkpoints: the resumed run replays steps already in metrics.jsonl."""
    run(settings(corpus, tmp_path, steps=6, checkpoint_every=4, eval_every=100), log=quiet)
    latest = checkpoint.latest(str(tmp_path / "checkpoints"))
    checkpoint._remove(latest)                      # as if killed before the final checkpoint
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')                  # and in the middle of a line
    run(settings(corpus, tmp_path, steps=8, checkpoint_every=4, eval_every=100), resume=True, log=quiet)
    with open(tmp_path / "metrics.jsonl") as f:
        lines = f.read().splitlines()
    assert lines[6] == '{"step": 7, "lo'
    rows = [json.loads(line) for line in lines[7:]]
    # step 7 was never logged whole: not a replay
    assert [(r["step"], r.get("replay", False)) for r in rows] == [(5, True), (6, True), (7, False), (8, False)]


# ------------------------------------------------------------------ 9, 10. awkward corpora

def test_a_one_file_corpus_trains(tmp_path):
    (tmp_path / "corpus").mkdir()
    rng = np.random.default_rng(3)
    words = ["def", "return", "x", "(", ")", ":", " ", "\n", "    ", "1", "+"]
    (tmp_path / "corpus" / "only.py").write_text("".join(rng.choice(words, size=3000)))
    lines = []
    summary = run(settings(str(tmp_path / "corpus"), tmp_path / "run", steps=3), log=lines.append)
    assert summary["steps"] == 3 and np.isfinite(summary["val_loss"])
    assert any("too few documents (1) for a held-out split by document: the held-out split is the last"
               in line for line in lines), lines


def test_an_empty_or_binary_corpus_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"the corpus .*empty holds no files"):
        run(settings(str(tmp_path / "empty"), tmp_path / "run"), log=quiet)
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "blob.bin").write_bytes(bytes(range(256)) * 100)
    with pytest.raises(ValueError, match=r"holds no text: its 1 files are binary"):
        run(settings(str(tmp_path / "binary"), tmp_path / "run"), log=quiet)
    (tmp_path / "binary" / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"SentencePiece could not train a 300-token tokenizer on this text "
                                         r"\(0 lines, 0 characters\)"):
        run(settings(str(tmp_path / "binary"), tmp_path / "run"), log=quiet)


def test_one_huge_line_trains_in_bounded_memory(tmp_path):
    """A corpus of one 4 MB line: the tokenizer used to refuse it (no sentence under its
    length limit) with a traceback, and encoding it whole took ~45 bytes per character."""
    (tmp_path / "corpus").mkdir()
    rng = np.random.default_rng(0)
    words = np.array(["alpha", "beta", "gamma", "x=1;", "42", "(", ")", " ", "  "])
    (tmp_path / "corpus" / "line.txt").write_text("".join(rng.choice(words, size=1_000_000))[:4_000_000])
    # VmHWM, the peak of this process's own memory (getrusage's maxrss would include the
    # parent's, which a forked child inherits)
    code = ("import sys\nsys.path.insert(0, sys.argv[3])\nfrom helpers import tiny_run_settings\n"
            "import os\nfrom palmcore.training import _Run\nos.makedirs(sys.argv[2])\n"
            "_Run(tiny_run_settings(sys.argv[1], sys.argv[2]), None, print)\n"
            "print('peak MB', [int(l.split()[1]) // 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "corpus"), str(tmp_path / "run"),
                           os.path.dirname(__file__)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    peak = int(re.search(r"peak MB (\d+)", proc.stdout).group(1))
    assert peak < 400, proc.stdout    # ~35 bytes per character of the line, including the interpreter


# ------------------------------------------------------------------ 13. the end of a run reads well

def test_the_cli_ends_with_a_summary_and_the_next_command(corpus, tmp_path, capsys):
    from palmcore.cli import main

    assert main(["train", "--corpus", corpus, "--vocab-size", "300", "--set", "d_model=32", "--set", "n_layers=1",
                 "--set", "n_heads=2", "--batch-size", "2", "--seq-len", "16", "--steps", "5", "--eval-every", "4",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "\033" not in out and not any(line.startswith("{") for line in out.splitlines())
    assert re.search(r"sample \(temperature 0.8, top-k 40, top-p 0.95, seed 0\), continuing a held-out prompt:\n"
                     r"(.|\n)+\n----- the model's continuation -----\n", out), out
    assert re.search(r"trained to step 5 \(160 tokens\) in \d+m \d+s\n", out), out
    assert re.search(r"validation at step 5: loss \d+\.\d{4}, perplexity \d+\.\d\d, \d+\.\d{3} bits/byte", out), out
    assert f"checkpoint: {tmp_path}/checkpoints/step-00000005" in out
    assert f"loss plot:  {tmp_path}/loss.png" in out
    assert f"try:        palmcore generate --checkpoint {tmp_path} --prompt 'def fibonacci('" in out


def test_an_absurd_model_is_refused_before_memory_runs_out(corpus, tmp_path):
    """`--set n_layers=...` used to run into the OOM killer; the child's address space is
    capped so that a regression fails here instead of exhausting the machine. 10^7 layers of
    the seed preset (7.9e12 parameters) meet the memory guard; 10^9 (9.3e14) the runtime's
    2^48 cap."""
    code = ("import resource, sys\nfrom palmcore.cli import main\n"
            "vm = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize')][0]\n"
            "resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 30), vm + (2 << 30)))\n"
            "sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "train", "--corpus", corpus, "--vocab-size", "300",
                           "--set", "n_layers=10000000", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert re.search(r"palmcore train: error: out of memory: the model needs [\d.]+ [KMGTP]iB \(\d+ bytes\) for its "
                     r"parameters and gradients \(\d+ parameters, float32\) but [\d.]+ [KMGTP]?i?B \(\d+ bytes\) are "
                     r"available", proc.stderr), proc.stderr
    proc = subprocess.run([sys.executable, "-c", code, "train", "--corpus", corpus, "--vocab-size", "300",
                           "--set", "n_layers=1000000000", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "palmcore train: error: the model has 9.341e+14 parameters, more than this runtime can hold (2^48)" \
        in proc.stderr, proc.stderr
