"""The README's examples as written: every `palmcore ...` line of its shell blocks parses (its
subcommand and flags exist, their values are accepted), and its Python examples run."""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shlex
import shutil

import pytest

import palmcore
from palmcore.cli import build_parser, parse_arguments

from helpers import start_server

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
COMMAND = re.compile(r"(^|\s)palmcore(\s|$)")  # the word, not `palmcore's` or `csrc/palmcore/`


def shell_commands() -> list[str]:
    """The `palmcore` commands of the README's shell blocks (```sh, ```bash or unnamed), each as
    the arguments after `palmcore`; `[--device cuda]` (an optional part) is taken as given."""
    commands = []
    for language, body in FENCE.findall(README.read_text()):
        if language not in ("", "sh", "bash"):
            continue
        for line in filter(COMMAND.search, body.splitlines()):
            for part in line.split("&&"):
                words = shlex.split(part.replace("[", "").replace("]", ""), comments=True)
                if "palmcore" in words:
                    commands.append(shlex.join(words[words.index("palmcore") + 1:]))
    return commands


def test_the_readme_has_palmcore_commands():
    assert len(shell_commands()) >= 10


@pytest.mark.parametrize("command", shell_commands())
def test_every_palmcore_command_in_the_readme_parses(command):
    args = parse_arguments(build_parser(), shlex.split(command))
    assert args.command in build_parser().subcommands


# The README's ```python blocks run as written, in order, in one namespace, in a fresh folder that
# holds what the README assumes a user has: `my_notes/` (a few text files) and `runs/default` (the
# first command's run; a small one is trained in its place, since the real one takes minutes).
# A block that needs what CI lacks says so in a mark on the line above it, and the set of marks is
# fixed here, so a block cannot drop out of the test unnoticed:
#   <!-- readme-test: with a server (...) -->  `palmcore serve --checkpoint runs/default` is
#       started for it (on a free port, put in place of the README's 8000);
#   <!-- readme-test: needs ... -->            only compiled (torch and transformers are not in CI).
PYTHON_BLOCK = re.compile(r"(?:^<!-- readme-test: (?P<mark>.*?) -->\n)?^```python\n(?P<code>.*?)^```",
                          re.MULTILINE | re.DOTALL)
MARKS = {"with a server (palmcore serve --checkpoint runs/default)",
         'needs torch and transformers (pip install ".[bench]")'}


def python_blocks() -> list[tuple[int, str | None, str]]:
    """(line, mark or None, code) of each ```python block of the README."""
    text = README.read_text()
    return [(text.count("\n", 0, m.start("code")) + 1, m.group("mark"), m.group("code"))
            for m in PYTHON_BLOCK.finditer(text)]


def test_the_readme_marks_only_the_blocks_it_means_to():
    marks = [mark for _, mark, _ in python_blocks() if mark is not None]
    assert sorted(marks) == sorted(MARKS)
    assert len(python_blocks()) >= 6


@contextlib.contextmanager
def serving(run: str):
    """`palmcore serve --checkpoint run` on a free port while the block runs; yields the port."""
    server, port = start_server(run)
    try:
        yield port
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_every_python_example_in_the_readme_runs_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    notes = tmp_path / "my_notes"
    notes.mkdir()
    stdlib = pathlib.Path(os.__file__).parent
    for name in ("os.py", "typing.py", "shutil.py", "textwrap.py", "string.py"):
        shutil.copy(stdlib / name, notes / name)
    palmcore.train(texts=[(stdlib / name).read_text() for name in ("os.py", "typing.py", "pathlib.py")],
                   out="runs/default", steps=10, d_model=64, n_layers=2, progress=False, sample_tokens=0)
    namespace: dict = {}
    for line, mark, code in python_blocks():
        compiled = compile(code, f"README.md:{line}", "exec")  # every block, run or not, is valid Python
        if mark is not None and mark.startswith("needs "):
            continue
        if mark is not None:
            with serving("runs/default") as port:
                assert "127.0.0.1:8000" in code
                exec(compile(code.replace("127.0.0.1:8000", f"127.0.0.1:{port}"), f"README.md:{line}", "exec"),
                     namespace)
        else:
            exec(compiled, namespace)
