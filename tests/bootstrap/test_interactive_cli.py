"""Bad input to ``rawvm shell``/``cp``/``forward``: one clear line, the right exit code, no traceback, nothing
contacted. The sessions themselves are in test_interactive.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from rawvm.cli import main
from rawvm.cli.shell import split_rest


@pytest.fixture(autouse=True)
def isolated_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RAWVM_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


CASES = [
    (["shell", "nosuch"], 1, "no cluster named 'nosuch' here: see 'rawvm ls'"),
    (["shell", "nosuch", "m0", "x", "--", "true"], 2, "rawvm shell CLUSTER [MACHINE] [-- CMD]: unexpected 'x'"),
    (["cp", "a", "b"], 2, "one side of 'rawvm cp' is MACHINE:PATH"),
    (["cp", "m0:a", "m1:b"], 2, "one side of 'rawvm cp' is MACHINE:PATH"),
    (["cp", "missing", "m0:b"], 2, "missing: no such file or directory"),
    (["cp", ".", "m0:b"], 2, "name the cluster with --cluster NAME (none is recorded here: see 'rawvm up')"),
    (["cp", "-c", "Bad!", ".", "m0:b"], 2, "invalid cluster name 'Bad!'"),
    (["forward", "nosuch", "6006"], 2, "'6006': write the ports as LOCAL:REMOTE, e.g. 6006:6006"),
    (["forward", "nosuch", "m0", "1:70000"], 2, "'1:70000': write the ports as LOCAL:REMOTE"),
    (["forward", "nosuch", "6006:6006"], 1, "no cluster named 'nosuch' here"),
]


@pytest.mark.parametrize(("argv", "code", "message"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_gives_one_clear_line(
    argv: list[str], code: int, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("rawvm: ") and message in lines[0], lines[0]


@pytest.mark.parametrize(
    ("rest", "split"),
    [
        ([], ("", [])),
        (["m1"], ("m1", [])),
        (["rawvm-ab12cd-m0"], ("rawvm-ab12cd-m0", [])),
        (["m1", "--", "ls", "-l"], ("m1", ["ls", "-l"])),
        (["--", "m1"], ("", ["m1"])),  # a command named like a machine, after an explicit '--'
        (["ls", "-l"], ("", ["ls", "-l"])),  # argparse dropped the leading '--'
    ],
)
def test_machine_and_command_are_told_apart(rest: list[str], split: tuple[str, list[str]]) -> None:
    assert split_rest(rest) == split
