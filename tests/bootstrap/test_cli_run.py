"""Bad input to ``rawvm run``/``up``/``logs``/``down``: one clear line, the right exit code, no traceback, and
nothing started (each check happens before any lock or launch)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from rawvm.cli import main


@pytest.fixture(autouse=True)
def isolated_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RAWVM_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # gettempdir() caches TMPDIR per process
    (tmp_path / "tmp").mkdir()
    return tmp_path


CASES = [
    (["run", "--provider", "gcp", "--", "true"], 2, "unknown provider 'gcp': choose one of local, qemu, aws"),
    (["run", "--keepalive", "abc", "--", "true"], 2, "--keepalive 'abc' is not a duration"),
    (["run", "--max-lifetime", "0s", "--", "true"], 2, "--max-lifetime must be longer than 0s"),
    (["run", "-n", "0", "--", "true"], 2, "-n 0: the number of machines must be at least 1"),
    (["run", "--vm-type", "m7i.large", "--cpu", "4", "--", "true"], 2, "either --vm-type or --cpu"),
    (["run", "--spot-policy", "cheap", "--", "true"], 2, "unknown spot policy 'cheap'"),
    (["run", "--gpu", "--", "true"], 2, "the local provider runs machines like this host"),
    (["run"], 2, "no command to run"),
    (["run", "--"], 2, "no command to run"),
    (["run", "--extra-ca-cert", "/nonexistent.pem", "--", "true"], 2, "--extra-ca-cert /nonexistent.pem"),
    (["run", "--cluster", "Bad Name!", "--", "true"], 2, "invalid cluster name"),
    (["run", "-n", "two", "--", "true"], 2, "invalid int value"),
    (["up", "--keepalive", "20 minutes"], 2, "--keepalive '20 minutes' is not a duration"),
    (["logs", "nosuch"], 1, "no cluster named 'nosuch' here: see 'rawvm ls'"),
    (["down", "nosuch"], 1, "no cluster named 'nosuch' here: see 'rawvm ls'"),
]


@pytest.mark.parametrize(("argv", "code", "message"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_gives_one_clear_line(
    argv: list[str], code: int, message: str, capsys: pytest.CaptureFixture[str], isolated_state: Path
) -> None:
    rc: int | str | None
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors (e.g. -n two) leave through SystemExit
        rc = exc.code
    assert rc == code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("rawvm: ")
    assert message in lines[0]
    assert "Traceback" not in err
    assert not list((isolated_state / "tmp").iterdir())  # nothing was locked, staged or launched


def test_the_installed_command_exits_2_without_traceback(tmp_path: Path) -> None:
    """The real entry point in a subprocess, as a user types it."""
    result = subprocess.run(
        [sys.executable, "-m", "rawvm.cli", "run", "--keepalive", "abc", "--", "python", "-c", "print(1)"],
        capture_output=True,
        text=True,
        env={"RAWVM_STATE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert result.stderr == ("rawvm: --keepalive 'abc' is not a duration: use e.g. 90s, 20m, 2h or 1h30m\n")
    assert result.stdout == ""


def test_run_help_shows_the_documented_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for flag in (
        "--provider",
        "-n N",
        "--vm-type",
        "--cpu",
        "--memory",
        "--gpu",
        "--arm",
        "--region",
        "--keepalive",
        "--max-lifetime",
        "--spot-policy",
        "--from",
        "--extra-ca-cert",
    ):
        assert flag in out
