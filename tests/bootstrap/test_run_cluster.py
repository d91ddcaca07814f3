"""``rawvm up`` / ``run --cluster`` / ``logs`` / ``ls --json`` / ``down`` across invocations, two local machines."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.local import local_project, processes_under

pytestmark = [pytest.mark.network, pytest.mark.slow]


def rawvm(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rawvm.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_up_run_logs_ls_down(tmp_path: Path) -> None:
    job = "import humanize\nprint('one', humanize.intcomma(1234567))\nprint('two')\n"
    project, tmp, env = local_project(tmp_path, {"requirements.txt": "humanize\n", "job.py": job})

    up = rawvm("up", "-n", "2", "--keepalive", "5m", "--from", "requirements.txt", env=env, cwd=project)
    assert up.returncode == 0, up.stderr
    cluster = up.stdout.strip()
    assert cluster.startswith("rawvm-")
    try:
        run = rawvm("run", "--cluster", cluster, "--timings", "--", "python", "job.py", env=env, cwd=project)
        assert run.returncode == 0, run.stderr
        start_up = sorted(line for line in run.stderr.splitlines() if " start-up: " in line)
        assert [line.split()[1] for line in start_up] == ["m0", "m1"], run.stderr
        assert all("environment_installed" in line and "first_task_started" in line for line in start_up)
        assert sorted(run.stdout.splitlines()) == ["[m0] one 1,234,567", "[m0] two", "[m1] one 1,234,567", "[m1] two"]

        logs = rawvm("logs", cluster, env=env, cwd=project)
        assert logs.returncode == 0, logs.stderr
        assert sorted(logs.stdout.splitlines()) == sorted(run.stdout.splitlines())
        followed = rawvm("logs", cluster, "--follow", env=env, cwd=project)  # the task has ended: follow ends too
        assert sorted(followed.stdout.splitlines()) == sorted(run.stdout.splitlines())

        listed = json.loads(rawvm("ls", "--json", env=env, cwd=project).stdout)
        (view,) = [v for v in listed if v["name"] == cluster]
        assert view["running"] == 2 and view["provider"] == "local"
        for machine in view["machines"]:  # the way to the first task, phase by phase, in order (boot_phases.py)
            phases = machine["boot_phases"]
            order = ["agent_up", "bundle_downloaded", "uv_ready", "environment_installed", "first_task_started"]
            assert sorted(phases) == sorted(order), phases  # local machines have no bootstrap script before the agent
            assert [phases[name] for name in order] == sorted(phases[name] for name in order)
    finally:
        down = rawvm("down", cluster, env=env, cwd=project)
    assert down.returncode == 0, down.stderr
    assert f"stopped 2 machines of {cluster}" in down.stderr
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and processes_under(tmp):
        time.sleep(0.2)
    assert not processes_under(tmp)
    assert json.loads(rawvm("ls", "--json", env=env, cwd=project).stdout) == []
    assert rawvm("down", cluster, env=env, cwd=project).returncode == 1  # forgotten
