"""The command line's own conventions: --help, a mistyped flag, abbreviations, defaults shown."""

from __future__ import annotations

import argparse

import pytest

from palmcore.cli import build_parser, main


def subcommand_parsers() -> dict:
    return build_parser().subcommands


def long_flags(parser: argparse.ArgumentParser) -> list[str]:
    return [flag for action in parser._actions for flag in action.option_strings
            if flag.startswith("--") and flag != "--help"]


def test_top_level_help_says_that_palmcore_alone_runs_the_default_job(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    assert "`palmcore` alone runs the default job" in " ".join(capsys.readouterr().out.split())


REQUIRED = {"export": ["--out", "x"], "import": ["--from", "x", "--out", "y"]}  # so that only the typo is wrong


@pytest.mark.parametrize("command", ["demo", "train", "generate", "serve", "export", "import", "plan", "info"])
def test_a_mistyped_flag_gets_the_usage_of_its_subcommand(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([command, *REQUIRED.get(command, []), "--no-such-flag", "1"])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.startswith(f"usage: palmcore {command} ")
    assert f"palmcore {command}: error: unrecognized arguments: --no-such-flag" in err


def test_a_prefix_of_a_long_flag_is_not_that_flag(capsys):
    """`--step 3` was taken as `--steps 3` (argparse's abbreviations): a typo that ran."""
    with pytest.raises(SystemExit) as stop:
        main(["train", "--step", "3"])
    assert stop.value.code == 2
    assert "unrecognized arguments: --step 3" in capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(subcommand_parsers()))
def test_no_parser_accepts_abbreviations(command):
    parser = subcommand_parsers()[command]
    flags = long_flags(parser)
    for flag in flags:
        prefix = flag[:-1]
        if prefix in flags:  # itself a flag
            continue
        with pytest.raises(SystemExit):
            parser.parse_args([prefix, "1"])


@pytest.mark.parametrize("command", sorted(subcommand_parsers()))
def test_help_shows_every_default(command):
    """Every flag that has a default tells it (shown as `(default: ...)`, or told in its own words,
    "default: a new document"), those without help text or with a default of 0 too."""
    parser = subcommand_parsers()[command]
    formatter = parser._get_formatter()
    for action in parser._actions:
        has_default = action.default not in (None, [], argparse.SUPPRESS) and action.default is not False
        if action.option_strings and has_default:
            told = formatter._expand_help(action)
            assert "default" in told, f"{command} --help: {action.option_strings[-1]} does not tell its default"
    text = " ".join(parser.format_help().split())
    if command == "train":  # its settings' defaults are those of palmcore.training (written into their help)
        for shown in ("(default: 100000)", "(default: 10000)", "(default: seed)", "(default: adafactor)"):
            assert shown in text
