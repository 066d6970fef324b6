"""The README's commands as written: every `palmcore ...` line of its shell blocks parses (its
subcommand and flags exist, their values are accepted)."""

from __future__ import annotations

import pathlib
import re
import shlex

import pytest

from palmcore.cli import build_parser, parse_arguments

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
