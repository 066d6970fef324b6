"""Text in, text out: palmcore.generate and `palmcore generate` on a tiny trained checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import palmcore
from palmcore.training import run

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
    assert done.stdout == ""


# ---- issue 9: text that is not UTF-8, huge integers, arguments checked before any output

def test_text_that_is_not_utf8_is_named(run_dir):
    for prompt in ("abc\udcff", "\ud800 lone high surrogate"):
        with pytest.raises(ValueError, match=r"prompt|text is not valid UTF-8 text"):
            palmcore.generate(run_dir, prompt)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(seed=2**64), ValueError, r"seed must be in \[0, 18446744073709551615\], got 18446744073709551616"),
    (dict(top_k=2**63), ValueError, r"top_k must be in \[0, 2147483647\], got 9223372036854775808"),
    (dict(max_new_tokens=2**63), ValueError, r"max_new_tokens must be in \[0, 2147483647\]"),
    (dict(stop_tokens=(2**64,)), ValueError, r"a stop token must be in \[0, 2147483647\]"),
    (dict(temperature=10**400), ValueError, r"temperature must be finite and >= 0, got inf"),
])
def test_huge_integers_are_named(run_dir, kwargs, error, match):
    model, _ = palmcore.load(run_dir)
    with pytest.raises(error, match=match):
        model.generate([[1, 2]], **kwargs)
    text_kwargs = {"stop": list(kwargs["stop_tokens"])} if "stop_tokens" in kwargs else kwargs  # its name there
    with pytest.raises(error, match=match):
        palmcore.generate(run_dir, "x", **text_kwargs)


def test_huge_token_ids_are_named(run_dir):
    model, _ = palmcore.load(run_dir)
    for prompt in ([[1, 2**63]], [[2**64 + 5]], [[1, -(2**70)]]):
        with pytest.raises(ValueError, match=r"prompt 0: token id -?\d+ is outside the vocabulary"):
            model.generate(prompt)


def raw_cli(*args: bytes, stdin: bytes = b""):
    return subprocess.run([sys.executable, "-m", "palmcore", "generate", *args], input=stdin,
                          capture_output=True, timeout=120, env={**os.environ, "PALMCORE_NUM_THREADS": "1"})


def test_cli_prompt_that_is_not_utf8(run_dir):
    done = raw_cli(b"--checkpoint", run_dir.encode(), b"--prompt", b"def \xff(")
    assert done.returncode == 2 and done.stdout == b""
    assert b"palmcore generate: error: text is not valid UTF-8 text: the byte 0xff, which is not UTF-8, " \
           b"at character 4" in done.stderr, done.stderr


def test_cli_interactive_survives_a_line_that_is_not_utf8(run_dir):
    done = raw_cli(b"--checkpoint", run_dir.encode(), b"--interactive", b"--max-new-tokens", b"4",
                   b"--temperature", b"0", stdin=b"bad \xfe\xff line\ndef\n\n")
    assert done.returncode == 0, done.stderr
    assert b"error: text is not valid UTF-8 text: the byte 0xfe" in done.stderr
    want = "def" + palmcore.generate(run_dir, "def", max_new_tokens=4, temperature=0)
    assert done.stdout.decode() == "> > " + want + "\n> "


@pytest.mark.parametrize("args,match", [
    (["--temperature", "-1"], "temperature must be finite and >= 0"),
    (["--top-p", "nan"], r"top_p must be in (0, 1], got nan"),
    (["--repetition-penalty", "0"], "repetition_penalty must be finite and > 0"),
    (["--seed", str(2**64)], "argument --seed: must be in [0, 18446744073709551615]"),
    (["--top-k", str(2**63)], "top_k must be in [0, 2147483647]"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1, got 0"),
])
def test_cli_checks_sampling_arguments_before_printing(run_dir, args, match):
    done = cli("--checkpoint", run_dir, "--prompt", "hello", *args)
    assert done.returncode == 2 and done.stdout == "", done.stdout
    assert match in done.stderr, done.stderr
