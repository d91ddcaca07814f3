"""The everyday loop on the local provider (real agent processes, real CLI subprocesses): variables and secrets,
Ctrl-C that cancels (and a second one that stops the machines), fresh code on warm machines, kept output."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import rawvm

from tests.helpers.local import local_project, processes_under

pytestmark = [pytest.mark.network, pytest.mark.slow]

SECRET = "s3cr3t-Hub-Token-8d1f"  # never written in any argv below: it comes from the environment
PRINT_ENV = (
    "import hashlib, os; print(os.environ['FOO'], hashlib.sha256(os.environ['HUB_TOKEN'].encode()).hexdigest()); "
    "print('token:', os.environ['HUB_TOKEN'])"
)


def rawvm_cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rawvm.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )


def files_holding(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


def argv_holding(needle: str) -> list[list[str]]:
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if any(needle in part for part in cmdline):
            out.append(cmdline)
    return out


def task_processes(tmp: Path, argv: list[str]) -> list[psutil.Process]:
    """The processes running ``argv`` whose working directory is a local machine's (under ``tmp``)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.info["cmdline"] == argv and Path(proc.cwd()).is_relative_to(tmp):
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def wait_for(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def test_env_and_secrets_reach_the_task_and_no_record(tmp_path: Path) -> None:
    project, tmp, env = local_project(tmp_path, {"requirements.txt": "humanize\n"})
    env["HUB_TOKEN"] = SECRET
    run = rawvm_cli(
        "run", "--from", "requirements.txt", "--keepalive", "5m", "--env", "FOO=bar", "--secret", "HUB_TOKEN",
        "--", "python", "-c", PRINT_ENV, env=env, cwd=project,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    digest = hashlib.sha256(SECRET.encode()).hexdigest()
    assert run.stdout.splitlines() == [f"bar {digest}", "token: ***"]
    cluster = json.loads(rawvm_cli("ls", "--json", env=env, cwd=project).stdout)[0]["name"]
    try:
        assert not argv_holding(SECRET)
        logs = rawvm_cli("logs", cluster, env=env, cwd=project)
        assert logs.stdout.splitlines() == [f"bar {digest}", "token: ***"]
        assert SECRET not in logs.stdout + logs.stderr + run.stderr
    finally:
        down = rawvm_cli("down", cluster, env=env, cwd=project)  # flushes the machine's logs to the sink
    assert down.returncode == 0, down.stderr
    assert wait_for(lambda: not processes_under(tmp), 30)
    # Nothing the laptop keeps (records, flushes) or the machine wrote (agent log, task logs) holds the value.
    assert files_holding(tmp_path, SECRET.encode()) == []


def test_up_env_then_fresh_code_on_the_warm_machine(tmp_path: Path) -> None:
    files = {
        "requirements.txt": "humanize\n",
        "job.py": "import mod\nmod.hello()\n",
        "mod.py": "def hello():\n    print('v1')\n",
    }
    project, _, env = local_project(tmp_path, files)
    env["HUB_TOKEN"] = SECRET
    up = rawvm_cli(
        "up", "--from", "requirements.txt", "--keepalive", "5m", "--env", "FOO=up", "--secret", "HUB_TOKEN",
        env=env, cwd=project,
    )  # fmt: skip
    assert up.returncode == 0, up.stderr
    cluster = up.stdout.strip()
    try:
        run = rawvm_cli("run", "--cluster", cluster, "--", "python", "-c", PRINT_ENV, env=env, cwd=project)
        assert run.returncode == 0, run.stderr
        digest = hashlib.sha256(SECRET.encode()).hexdigest()
        assert run.stdout.splitlines() == [f"up {digest}", "token: ***"]  # handed by 'up', kept for later tasks
        assert "sync: the machines have the project's current files" in run.stderr
        run = rawvm_cli(
            "run", "--cluster", cluster, "--compile-bytecode", "--no-sync", "--", "true", env=env, cwd=project
        )
        assert run.returncode == 0, run.stderr
        assert f"--compile-bytecode: ignored, {cluster}'s machines keep the install settings" in run.stderr

        (project / "mod.py").write_text("def hello():\n    print('v2')\n")
        (project / "extra.py").write_text("X = 1\n")
        run = rawvm_cli("run", "--cluster", cluster, "--no-sync", "--", "python", "job.py", env=env, cwd=project)
        assert run.stdout == "v1\n", run.stderr  # --no-sync: what the machine has
        run = rawvm_cli("run", "--cluster", cluster, "--", "python", "job.py", env=env, cwd=project)
        assert run.returncode == 0, run.stderr
        assert run.stdout == "v2\n"
        assert "sync: sent 2 changed files" in run.stderr
        run = rawvm_cli(
            "run", "--cluster", cluster, "--", "python", "-c", "import extra; print(extra.X)", env=env, cwd=project
        )
        assert run.stdout == "1\n"
        assert "sync: the machines have the project's current files" in run.stderr  # only the difference travels

        (project / "requirements.txt").write_text("humanize\nsix\n")  # an added package: installed before the task
        run = rawvm_cli(
            "run", "--cluster", cluster, "--", "python", "-c", "import six; print(six.__name__)", env=env, cwd=project
        )
        assert run.returncode == 0, run.stderr
        assert run.stdout == "six\n"
        assert "sync: the environment changed: installed its new lock" in run.stderr
        run = rawvm_cli("run", "--cluster", cluster, "--", "python", "-c", "import humanize", env=env, cwd=project)
        assert run.returncode == 0, run.stderr
        assert "the environment changed" not in run.stderr  # the machine's bundle is the new lock now

        missing = rawvm_cli("run", "--cluster", cluster, "--", "no-such-command-rawvm", env=env, cwd=project)
        assert missing.returncode == 127
        assert "rawvm: command not found on m0: no-such-command-rawvm" in missing.stderr.splitlines()
    finally:
        rawvm_cli("down", cluster, env=env, cwd=project)
    assert files_holding(tmp_path, SECRET.encode()) == []


def _start_sleeping_run(tmp_path: Path) -> tuple[subprocess.Popen[str], Path, dict[str, str], Path]:
    project, tmp, env = local_project(tmp_path, {"requirements.txt": "humanize\n"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "rawvm.cli", "run", "--from", "requirements.txt", "--keepalive", "5m",
         "--", "sleep", "600"],
        cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert wait_for(lambda: task_processes(tmp, ["sleep", "600"]) or proc.poll() is not None, 120)
    assert proc.poll() is None, proc.communicate()
    return proc, project, env, tmp


def test_ctrl_c_cancels_the_task_and_says_one_line(tmp_path: Path) -> None:
    proc, project, env, tmp = _start_sleeping_run(tmp_path)
    time.sleep(0.5)  # the output streams are open
    proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    try:
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 130
        assert time.monotonic() - started < 10
        assert task_processes(tmp, ["sleep", "600"]) == []
        lines = err.strip().splitlines()
        after = [line for line in lines if "cancelled" in line or "interrupted" in line]
        assert len(after) == 1, err
        assert lines[-1] == after[0]
        assert "rawvm down rawvm-" in after[0] and "stops by itself after 5m idle" in after[0]
        assert "Traceback" not in err
        cluster = json.loads(rawvm_cli("ls", "--json", env=env, cwd=project).stdout)[0]["name"]
        assert processes_under(tmp)  # the machine idles off later, it is not stopped
        tasks = rawvm_cli("logs", cluster, env=env, cwd=project)  # output so far is kept: the task's logs answer
        assert tasks.returncode == 0, tasks.stderr
    finally:
        proc.kill()
        for record in json.loads(rawvm_cli("ls", "--json", env=env, cwd=project).stdout):
            rawvm_cli("down", record["name"], env=env, cwd=project)


def test_a_second_ctrl_c_stops_the_machines(tmp_path: Path) -> None:
    proc, project, env, tmp = _start_sleeping_run(tmp_path)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=90)
        assert proc.returncode == 130, err
        assert "stopped 1 machine of rawvm-" in err.strip().splitlines()[-1]
        assert wait_for(lambda: not processes_under(tmp), 30)
        assert json.loads(rawvm_cli("ls", "--json", env=env, cwd=project).stdout) == []
    finally:
        proc.kill()


def test_rawvm_cancel_from_another_terminal(tmp_path: Path) -> None:
    proc, project, env, tmp = _start_sleeping_run(tmp_path)
    try:
        cluster = json.loads(rawvm_cli("ls", "--json", env=env, cwd=project).stdout)[0]["name"]
        unknown = rawvm_cli("cancel", cluster, "nosuchtask", env=env, cwd=project)
        assert unknown.returncode == 2 and f"no task 'nosuchtask' on the machines of {cluster}" in unknown.stderr
        assert task_processes(tmp, ["sleep", "600"])  # nothing else was touched
        cancel = rawvm_cli("cancel", cluster, env=env, cwd=project)
        assert cancel.returncode == 0, cancel.stderr
        assert "cancelled 1 task on m0" in cancel.stderr
        proc.communicate(timeout=30)
        assert proc.returncode == 143  # the task ended by SIGTERM: 128 + 15
        assert task_processes(tmp, ["sleep", "600"]) == []
    finally:
        proc.kill()
        rawvm_cli("down", cluster, env=env, cwd=project)


def test_capture_keeps_each_machines_output_and_exit_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    project, tmp, env = local_project(tmp_path, {"requirements.txt": "humanize\n"})
    monkeypatch.chdir(project)
    monkeypatch.setenv("RAWVM_STATE_DIR", env["RAWVM_STATE_DIR"])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    code = "import os, sys; m = os.getcwd().split('/')[-3]; print('hello from', m); sys.exit(3 if m == 'm1' else 0)"
    result = rawvm.run(
        ["python", "-c", code], n=2, source="requirements.txt", keepalive="2s", capture=True, output=io.StringIO()
    )
    assert result.exit_code == 3
    assert {mid: (o.exit_code, o.stdout) for mid, o in result.outputs.items()} == {
        "m0": (0, "hello from m0\n"),
        "m1": (3, "hello from m1\n"),
    }
    assert result.failed == ["m1"]
    assert "m1 failed (3)" in capsys.readouterr().err


def test_batch_tasks_see_env_and_secrets(tmp_path: Path) -> None:
    project, tmp, env = local_project(tmp_path, {"requirements.txt": ""})
    env["HUB_TOKEN"] = SECRET
    out = tmp_path / "out"
    out.mkdir()
    code = (
        "import hashlib, os, pathlib; i = os.environ['RAWVM_TASK_ID']; "
        f"pathlib.Path({str(out)!r}, i).write_text(os.environ['FOO'] + ' ' + "
        "hashlib.sha256(os.environ['HUB_TOKEN'].encode()).hexdigest()); print('token', os.environ['HUB_TOKEN'])"
    )
    batch = rawvm_cli(
        "batch", "run", "--array", "0-3", "-n", "2", "--keepalive", "3s", "--from", "requirements.txt",
        "--env", "FOO=batch", "--secret", "HUB_TOKEN", "--", "python", "-c", code, env=env, cwd=project,
    )  # fmt: skip
    assert batch.returncode == 0, batch.stderr
    digest = hashlib.sha256(SECRET.encode()).hexdigest()
    assert {p.name: p.read_text() for p in out.iterdir()} == {str(i): f"batch {digest}" for i in range(4)}
    assert wait_for(lambda: not processes_under(tmp), 60)
    assert files_holding(tmp_path, SECRET.encode()) == []  # not in the staged spec, the records or the flushes


@pytest.mark.parametrize("how", ["ctrl-c", "rawvm cancel"])
def test_cancelling_a_batch_stops_its_running_and_queued_tasks(tmp_path: Path, how: str) -> None:
    project, tmp, env = local_project(tmp_path, {"requirements.txt": ""})
    proc = subprocess.Popen(
        [sys.executable, "-m", "rawvm.cli", "batch", "run", "--array", "0-9", "--tasks-per-machine", "2",
         "--keepalive", "5m", "--from", "requirements.txt", "--", "sleep", "600"],
        cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert wait_for(lambda: len(task_processes(tmp, ["sleep", "600"])) == 2 or proc.poll() is not None, 120)
        cluster = json.loads(rawvm_cli("ls", "--json", env=env, cwd=project).stdout)[0]["name"]
        if how == "ctrl-c":
            proc.send_signal(signal.SIGINT)
        else:
            cancel = rawvm_cli("cancel", cluster, env=env, cwd=project)
            assert "cancelled 2 tasks on m0" in cancel.stderr, cancel.stderr
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == (130 if how == "ctrl-c" else 1), err
        if how == "ctrl-c":
            assert "cancelled the batch (2 running tasks stopped" in err.strip().splitlines()[-1]
        assert task_processes(tmp, ["sleep", "600"]) == []
        time.sleep(1.0)
        assert task_processes(tmp, ["sleep", "600"]) == []  # nothing queued started afterwards
    finally:
        proc.kill()
        for record in json.loads(rawvm_cli("ls", "--json", env=env, cwd=project).stdout):
            rawvm_cli("down", record["name"], env=env, cwd=project)


MAP_SCRIPT = """\
import hashlib, os, pathlib, sys, time

import rawvm

MARKS, DIGEST = sys.argv[1], sys.argv[2]


@rawvm.function(n=1, slots=1, keepalive="60s", source="requirements.txt", env={"MARKS": MARKS}, secrets=["HUB_TOKEN"])
def slow(x):
    assert hashlib.sha256(os.environ["HUB_TOKEN"].encode()).hexdigest() == DIGEST
    pathlib.Path(os.environ["MARKS"], str(x)).write_text(str(os.getpid()))
    time.sleep(600)


if __name__ == "__main__":
    slow.map(range(3))
"""


def test_ctrl_c_in_f_map_cancels_running_and_queued_calls(tmp_path: Path) -> None:
    project, _, env = local_project(tmp_path, {"requirements.txt": "six\n", "work.py": MAP_SCRIPT})
    env["HUB_TOKEN"] = SECRET
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "work.py", str(marks), hashlib.sha256(SECRET.encode()).hexdigest()],
        cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert wait_for(lambda: (marks / "0").exists() or proc.poll() is not None, 180), proc.communicate()
        pid = int((marks / "0").read_text())
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
        assert proc.returncode != 0
        assert wait_for(lambda: not psutil.pid_exists(pid), 10)  # the running call's worker was cancelled
        time.sleep(2.0)
        assert sorted(p.name for p in marks.iterdir()) == ["0"]  # the queued calls never ran
    finally:
        proc.kill()
        for record in json.loads(rawvm_cli("ls", "--json", env=env, cwd=project).stdout):
            rawvm_cli("down", record["name"], env=env, cwd=project)
    assert files_holding(tmp_path, SECRET.encode()) == []


def test_dask_workers_see_env_and_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    distributed = pytest.importorskip("distributed")
    project, tmp, _ = local_project(tmp_path, {})
    monkeypatch.chdir(project)
    monkeypatch.setenv("RAWVM_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    cluster = rawvm.dask_cluster(1, keepalive="1m", env={"FOO": "dask"}, secrets={"HUB_TOKEN": SECRET})
    try:
        with distributed.Client(cluster) as client:
            client.wait_for_workers(1, timeout=120)
            seen = client.run(lambda: (os.environ["FOO"], hashlib.sha256(os.environ["HUB_TOKEN"].encode()).hexdigest()))
            assert list(seen.values()) == [("dask", hashlib.sha256(SECRET.encode()).hexdigest())]
            assert not argv_holding(SECRET)
    finally:
        cluster.close()
    assert wait_for(lambda: not processes_under(tmp), 60)
    assert files_holding(tmp_path, SECRET.encode()) == []
