"""``rawvm top`` in a real 80x24 terminal (tmux) against a local cluster: each machine's phase and CPU show."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

from tests.helpers.local import local_project
from tests.systools import need_tool


def rawvm(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rawvm.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_top_in_an_80x24_terminal_shows_each_machines_phase_and_cpu(tmp_path: Path) -> None:
    tmux = need_tool("tmux", "tmux")
    project, _, env = local_project(tmp_path, {"requirements.txt": ""})
    up = rawvm("up", "-n", "2", "--keepalive", "2m", "--from", "requirements.txt", env=env, cwd=project)
    assert up.returncode == 0, up.stderr
    cluster = up.stdout.strip()
    session = f"rawvm-top-{uuid.uuid4().hex[:8]}"
    socket = str(tmp_path / "tmux.sock")  # a server of this test's own: no user's tmux is touched
    top = f"{sys.executable} -m rawvm.cli top {cluster}"
    try:
        subprocess.run(
            [tmux, "-S", socket, "new-session", "-d", "-s", session, "-x", "80", "-y", "24", top],
            env={**env, "TERM": "xterm-256color"},
            cwd=project,
            check=True,
            timeout=30,
        )
        pane = ""
        rows: dict[str, str] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(1)
            pane = subprocess.run(
                [tmux, "-S", socket, "capture-pane", "-p", "-t", session],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
            rows = {line.split()[0]: line for line in pane.splitlines() if re.match(r"m\d ", line)}
            if len(rows) == 2 and all(re.search(r"\b(idle|busy|ready)\b.*\d+%", row) for row in rows.values()):
                break
        assert set(rows) == {"m0", "m1"}, pane
        for row in rows.values():
            assert re.search(r"\b(idle|busy|ready)\b", row), pane  # the phase, in full
            assert re.search(r"\s\d+%", row), pane  # the CPU
        assert all(len(line) <= 80 for line in pane.splitlines())
        print(pane)  # shown with -s, or in a failure's captured output
    finally:
        subprocess.run([tmux, "-S", socket, "kill-server"], capture_output=True, timeout=10)
        rawvm("down", cluster, env=env, cwd=project)
