"""``--env``/``--secret`` and ``env=``/``secrets=`` as options: parsing, one-line mistakes, and secret values kept
out of every repr and record (no machines here)."""

from __future__ import annotations

import json

import pytest
from rawvm.api import launch_options
from rawvm.cli import build_parser, main
from rawvm.cli.flags import launch_options as from_flags
from rawvm.options import LaunchOptions, TaskEnvironment

SECRET = "tok-Secret-Value-42"


def test_flags_on_every_launching_command() -> None:
    parser = build_parser()
    for argv in (["run"], ["up"], ["batch", "run", "--array", "0-1"], ["dask", "up"]):
        args = parser.parse_args([*argv, "--env", "A=1", "--env", "B", "--secret", "S=x"])
        assert args.env == ["A=1", "B"] and args.secrets == ["S=x"]


def test_bare_names_come_from_here_and_values_may_hold_equals(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUB_TOKEN", SECRET)
    monkeypatch.setenv("MODE", "fast")
    args = build_parser().parse_args(
        ["run", "--env", "MODE", "--env", "URL=a=b", "--secret", "HUB_TOKEN", "--", "true"]
    )
    options = from_flags(args)
    assert options.task_env.env == (("MODE", "fast"), ("URL", "a=b"))
    assert options.task_env.all_values()["HUB_TOKEN"] == SECRET
    assert options.task_env.secret_names == ["HUB_TOKEN"]


def test_secret_values_are_in_no_repr_or_record(monkeypatch: pytest.MonkeyPatch) -> None:
    options = launch_options(env={"PLAIN": "p"}, secrets={"HUB_TOKEN": SECRET})
    assert SECRET not in repr(options) and "HUB_TOKEN" in repr(options)
    record = json.dumps(options.to_json())
    assert SECRET not in record and "HUB_TOKEN" in record
    monkeypatch.setenv("HUB_TOKEN", SECRET)
    again = LaunchOptions.from_json(json.loads(record))  # a batch retry: the value from the environment again
    assert again.task_env == options.task_env
    monkeypatch.delenv("HUB_TOKEN")
    assert LaunchOptions.from_json(json.loads(record)).task_env.secrets == ()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--env", "NOPE_NOT_SET_RAWVM"], "--env NOPE_NOT_SET_RAWVM: not set here"),
        (["--secret", "=x"], "--secret '': a name must be non-empty"),
    ],
)
def test_a_bad_variable_is_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", *argv, "--", "true"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rawvm: ") and message in err


def test_run_help_names_the_new_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for flag in ("--env", "--secret", "--no-sync"):
        assert flag in out


def test_an_empty_task_environment_is_false() -> None:
    assert not TaskEnvironment()
    assert TaskEnvironment.parse(["A=1"])
