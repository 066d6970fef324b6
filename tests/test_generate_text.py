"""Text in, text out: palmcore.generate and `palmcore generate` on a tiny trained checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import palmcore
from palmcore.train import run

from helpers import tiny_run_settings


@pytest.fixture(scope="module")
def run_dir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run(tiny_run_settings(corpus, out, steps=8, sample_tokens=0, seq_len=32), log=lambda _: None)
    return str(out)


def cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "palmcore", "generate", *args], input=stdin,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PALMCORE_NUM_THREADS": "1"})


def test_generate_text_matches_token_generation(run_dir):
    model, tokenizer = palmcore.load(run_dir)
    kw = dict(max_new_tokens=12, temperature=0.9, top_k=20, top_p=0.9, seed=4)
    text = palmcore.generate(run_dir, "def x(", **kw)
    ids = model.generate([[1] + tokenizer.encode("def x(")], stop_tokens=(1,), **kw)[0]
    assert text == tokenizer.decode([t for t in ids if t != 1])
    # a list decodes together; row i draws from (seed, i, step), so row 0 is the single prompt's text
    both = palmcore.generate(run_dir, ["def x(", "return"], **kw)
    assert both[0] == text and both[1] == palmcore.generate(run_dir, ["x", "return"], **kw)[1]
    assert palmcore.generate(os.path.join(run_dir, "checkpoints"), "def x(", **kw) == text


def test_generate_text_errors(run_dir, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        palmcore.generate(str(tmp_path / "nothing"), "x")
    with pytest.raises(ValueError, match="no palmcore checkpoint"):
        palmcore.generate(str(tmp_path), "x")
    with pytest.raises(TypeError, match="prompt must be a string or a list of strings"):
        palmcore.generate(run_dir, [1, 2])
    with pytest.raises(ValueError, match="max_seq_len"):
        palmcore.generate(run_dir, "x", max_new_tokens=1000)


def test_cli_prints_the_prompt_and_its_continuation(run_dir):
    done = cli("--checkpoint", run_dir, "--prompt", "def x(", "--max-new-tokens", "10", "--temperature", "0")
    assert done.returncode == 0, done.stderr
    want = "def x(" + palmcore.generate(run_dir, "def x(", max_new_tokens=10, temperature=0)
    assert done.stdout == want + "\n"


def test_cli_interactive_reads_prompts_until_an_empty_line(run_dir):
    done = cli("--checkpoint", run_dir, "--interactive", "--max-new-tokens", "6", "--temperature", "0",
               stdin="def\nreturn\n\nnever read\n")
    assert done.returncode == 0, done.stderr
    want = [p + palmcore.generate(run_dir, p, max_new_tokens=6, temperature=0) for p in ("def", "return")]
    assert done.stdout == "> " + want[0] + "\n> " + want[1] + "\n> "
    assert "never read" not in done.stdout


def test_cli_errors_are_clear(run_dir, tmp_path):
    done = cli("--checkpoint", str(tmp_path / "missing"))
    assert done.returncode == 2 and "palmcore generate: error: no palmcore checkpoint" in done.stderr
    done = cli("--checkpoint", run_dir, "--top-p", "2")
    assert done.returncode == 2 and "top_p must be in (0, 1]" in done.stderr
