"""The README's main command, from a fresh clone, on the default ``local`` provider.

A user environment (a real venv with one small pure-Python package from PyPI, ``humanize``, which neither the
agent nor rawvm depends on) is locked, installed by a detached local agent, and a script importing it runs
there. Its output must stream (the script waits until the test has seen its first line), its exit code must
come back as rawvm's, and once the keepalive passes no agent process and no machine directory may be left.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers.local import processes_under, stream_stdout

pytestmark = [pytest.mark.network, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """\
import sys, time
from pathlib import Path
import humanize

print("size:", humanize.naturalsize(123456789), flush=True)
go = Path(sys.argv[1])
deadline = time.monotonic() + 120
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.1)
print("after go:", go.exists(), flush=True)
print("to stderr", file=sys.stderr, flush=True)
sys.exit(3)
"""


def readme_run_command(readme: Path) -> list[str]:
    """The README's ``uv run rawvm run ...`` line for a clone, as argv (its trailing ``# comment`` dropped); the
    lines before it show rawvm in one's own project (``python train.py``), not something a clone can run."""
    text = readme.read_text()
    for line in text[text.find("in a clone of this repo") :].splitlines():
        if line.strip().startswith("uv run rawvm run "):
            return shlex.split(line, comments=True)
    raise AssertionError(f"{readme} shows no 'uv run rawvm run ...' command: the README's main command is rawvm run")


def wait_nothing_left(tmp: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while (processes_under(tmp) or any(tmp.glob("rawvm-local-*/*"))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_under(tmp) == []
    assert not any(tmp.glob("rawvm-local-*/*"))


def fresh_clone(tmp_path: Path) -> tuple[Path, dict[str, str], Path]:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    state, tmp = tmp_path / "state", tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "RAWVM_STATE_DIR": str(state), "TMPDIR": str(tmp)}
    env.pop("VIRTUAL_ENV", None)  # the clone's own environment, as for a newcomer
    return clone, env, tmp


def test_the_readme_main_command_runs_as_written(tmp_path: Path) -> None:
    """Exactly the README's line in a fresh clone (with a short keepalive added so the test can see the end)."""
    clone, env, tmp = fresh_clone(tmp_path)
    argv = readme_run_command(clone / "README.md")
    argv[4:4] = ["--keepalive", "3s"]  # after "uv run rawvm run"
    result = subprocess.run(argv, cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "the command's output comes back"
    assert "Traceback" not in result.stderr
    wait_nothing_left(tmp)


def test_readme_main_command_from_a_fresh_clone(tmp_path: Path) -> None:
    clone, env, tmp = fresh_clone(tmp_path)
    state = tmp_path / "state"
    user_env = tmp_path / "user-env"
    subprocess.run(["uv", "venv", "--quiet", "--python", sys.executable, str(user_env)], check=True)
    subprocess.run(
        ["uv", "pip", "install", "--quiet", "--python", str(user_env / "bin" / "python"), "humanize"], check=True
    )
    (clone / "script.py").write_text(SCRIPT)
    go = tmp_path / "go"

    command = ["uv", "run", "rawvm", "run", "--from", str(user_env), "--keepalive", "3s", "--"]
    proc, lines, stdout_reader = stream_stdout([*command, "python", "script.py", str(go)], clone, env)
    errors: list[str] = []
    stderr_reader = threading.Thread(target=lambda: errors.extend(proc.stderr or []), daemon=True)
    stderr_reader.start()
    readers = [stdout_reader, stderr_reader]
    try:
        first = lines.get(timeout=600)  # fresh clone: uv syncs the workspace, then lock, launch, install
        assert first == "size: 123.5 MB\n"
        assert proc.poll() is None  # streamed while the task still runs
        go.touch()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    for reader in readers:
        reader.join(timeout=10)
    err = "".join(errors)
    assert proc.returncode == 3, err
    assert lines.get(timeout=5) == "after go: True\n"
    assert "to stderr\n" in err
    assert "Traceback" not in err

    (record_file,) = (state / "clusters").glob("*.json")
    record = json.loads(record_file.read_text())
    assert record_file.stat().st_mode & 0o777 == 0o600
    (machine,) = record["machines"]
    machine_dir = Path(machine["details"]["dir"])
    assert machine_dir.is_relative_to(tmp)
    wait_nothing_left(tmp)  # keepalive 3s, then the agent exits and its wrapper ends its tree and removes its dir
    assert not machine_dir.exists()
