"""Warm runs with the environment's fingerprint kept (rawvm.env_fingerprint) on the local provider, through the real
CLI: an unchanged environment is not scanned again, and a change made after it was kept is still locked and
installed before the task, as are changed files."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rawvm.env_fingerprint import FRESH_S

from tests.helpers.local import local_project
from tests.systools import need_index

pytestmark = [pytest.mark.network, pytest.mark.slow]


def rawvm_cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rawvm.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_a_kept_fingerprint_still_sees_a_changed_environment_and_files(tmp_path: Path) -> None:
    need_index()
    files = {"requirements.txt": "humanize\n", "mod.py": "X = 'v1'\n"}
    project, _, env = local_project(tmp_path, files)
    requirements = str((project / "requirements.txt").resolve())
    up = rawvm_cli("up", "--from", "requirements.txt", "--keepalive", "5m", env=env, cwd=project)
    assert up.returncode == 0, up.stderr
    cluster = up.stdout.strip()
    kept = tmp_path / "state" / "fingerprints.json"
    try:
        time.sleep(FRESH_S + 0.5)  # inputs written a moment ago are not kept
        for _ in range(2):
            run = rawvm_cli(
                "run", "--cluster", cluster, "--", "python", "-c", "import mod; print(mod.X)", env=env, cwd=project
            )
            assert run.returncode == 0, run.stderr
            assert run.stdout == "v1\n"
            assert "the environment changed" not in run.stderr
        assert requirements in json.loads(kept.read_text())  # kept, and used by the second run

        (project / "requirements.txt").write_text("humanize\nsix\n")
        (project / "mod.py").write_text("X = 'v2'\n")
        run = rawvm_cli(
            "run", "--cluster", cluster, "--", "python", "-c", "import six, mod; print(mod.X)", env=env, cwd=project
        )
        assert run.returncode == 0, run.stderr
        assert run.stdout == "v2\n"
        assert "sync: the environment changed: installed its new lock" in run.stderr
        assert "sync: sent 2 changed files" in run.stderr  # mod.py and requirements.txt
        run = rawvm_cli("run", "--cluster", cluster, "--", "python", "-c", "import six", env=env, cwd=project)
        assert run.returncode == 0, run.stderr
        assert "the environment changed" not in run.stderr
    finally:
        rawvm_cli("down", cluster, env=env, cwd=project)
