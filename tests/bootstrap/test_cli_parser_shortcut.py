"""``rawvm <command>`` builds only its own command's parser (rawvm.cli.MODULE_OF): the same parser as in the whole
one, for every word of the shortcut; a word outside it still gets the whole parser."""

from __future__ import annotations

import argparse

import pytest
from rawvm import cli


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_each_shortcut_word_gets_the_parser_the_whole_one_has() -> None:
    whole = subcommands(cli.build_parser())
    for word in cli.MODULE_OF:
        alone = subcommands(cli.build_parser(word))
        assert word in alone, f"{cli.MODULE_OF[word]} does not register {word!r}: fix rawvm.cli.MODULE_OF"
        assert alone[word].format_help() == whole[word].format_help()


@pytest.mark.parametrize("word", [None, "report", "no-such-command"])
def test_other_words_get_every_command(word: str | None) -> None:
    assert subcommands(cli.build_parser(word)).keys() == subcommands(cli.build_parser()).keys()


def test_a_shortcut_command_line_parses_as_before(capsys: pytest.CaptureFixture[str]) -> None:
    args = cli.build_parser("run").parse_args(["run", "--cluster", "c", "--no-sync", "--", "true"])
    assert (args.cluster, args.sync, args.cmd) == ("c", False, ["--", "true"])
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--no-such-flag", "--", "true"])
    assert exc.value.code == 2
    assert "rawvm: unrecognized arguments: --no-such-flag" in capsys.readouterr().err
