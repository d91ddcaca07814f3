"""``rawvm notebook``'s mistakes are one line and exit code 2, before anything launches; a reused cluster whose
environment has no JupyterLab is one clear line too (a real local machine, no JupyterLab in its lock)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from rawvm.cli import main

from tests.helpers.local import isolate_state, local_project


@pytest.fixture(autouse=True)
def isolated_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return isolate_state(tmp_path, monkeypatch)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--port", "70000"], "rawvm: --port 70000: a port is 0 (any free one) to 65535"),
        (
            ["--cluster", "nosuch"],
            "rawvm: --cluster nosuch: no such cluster (there are no clusters here; see 'rawvm ls'); "
            "a new cluster is named with --name",
        ),
        (["--keepalive", "-5m"], "rawvm: --keepalive '-5m' is not a duration: use e.g. 90s, 20m, 2h or 1h30m"),
    ],
)
def test_a_mistake_is_one_line(argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["notebook", "--no-browser", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [expected], err


@pytest.mark.slow
def test_a_cluster_without_jupyterlab_is_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    project, _, env = local_project(tmp_path / "p", {"requirements.txt": ""})

    def rawvm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "rawvm.cli", *args],
            env=env,
            cwd=project,
            capture_output=True,
            text=True,
            timeout=300,
        )

    up = rawvm("up", "--keepalive", "2m", "--from", "requirements.txt")
    assert up.returncode == 0, up.stderr
    name = up.stdout.strip()
    try:
        result = rawvm("notebook", "--no-browser", "--cluster", name)
        assert result.returncode == 1, result.stderr
        assert result.stderr.strip().splitlines()[-1] == (
            f"rawvm: cluster {name}'s environment has no JupyterLab: run 'rawvm notebook' without --cluster "
            "(the lock adds it), or add jupyterlab to the environment and launch again"
        )
        assert "Traceback" not in result.stderr and result.stdout == ""
    finally:
        rawvm("down", name)
