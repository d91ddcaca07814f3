"""Tasks: real subprocesses through TaskManager; log cap, chatty guard, env/cwd, interruption, restarts."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st
from rawvm_agent.config import TaskConfig
from rawvm_agent.environment import Environment
from rawvm_agent.logs import MASK, Redactor, StreamRedactor
from rawvm_agent.tasks import RateWatch, Task, TaskError, TaskManager, TaskRequest, TaskState, read_log


def manager(tmp_path: Path, **config: int) -> TaskManager:
    return TaskManager(TaskConfig(**config), tmp_path / "tasks", Redactor())


def own_python(tmp_path: Path) -> Environment:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return Environment(venv=None, work_dir=work)


async def run(mgr: TaskManager, where: Environment, argv: list[str], **request: object) -> Task:
    body = {"argv": argv, **request}
    task = await mgr.start(TaskRequest.from_json(body), where, {"PATH": os.environ["PATH"], "HOME": "/root"})
    await asyncio.wait_for(task.done.wait(), 60)
    return task


async def test_env_cwd_and_venv_activation(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    env = Environment(venv=venv, work_dir=work)
    code = "import os; print(os.getcwd()); [print(os.environ[k]) for k in ('VIRTUAL_ENV', 'PATH', 'X')]"
    task = await run(manager(tmp_path), env, [sys.executable, "-c", code], env={"X": "1"}, cwd="sub")
    cwd, virtual_env, path, x = task.log_path("stdout").read_text().splitlines()
    assert cwd == str(work / "sub")
    assert virtual_env == str(venv)
    assert path.split(os.pathsep)[0] == str(venv / "bin")
    assert x == "1"
    assert task.record.exit_code == 0 and task.record.state == TaskState.EXITED


async def test_systemd_notify_socket_does_not_reach_tasks(tmp_path: Path) -> None:
    env = own_python(tmp_path)
    mgr = manager(tmp_path)
    request = TaskRequest.from_json(
        {"argv": [sys.executable, "-c", "import os; print(os.environ.get('NOTIFY_SOCKET'))"]}
    )
    task = await mgr.start(request, env, {"PATH": os.environ["PATH"], "NOTIFY_SOCKET": "/run/systemd/notify"})
    await task.done.wait()
    assert task.log_path("stdout").read_text() == "None\n"


async def test_log_cap_drops_and_counts_the_rest(tmp_path: Path) -> None:
    mgr = manager(tmp_path, log_cap_bytes=1000)
    task = await run(mgr, own_python(tmp_path), [sys.executable, "-c", "import sys; sys.stdout.write('x' * 5000)"])
    assert task.log_path("stdout").stat().st_size == 1000
    assert task.record.bytes_written["stdout"] == 1000
    assert task.record.bytes_dropped["stdout"] == 4000
    assert any("log cap" in w for w in task.record.warnings)
    assert task.record.exit_code == 0


async def test_chatty_task_warns_in_status_and_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mgr = manager(tmp_path, chatty_bytes_per_s=1000)
    await run(mgr, own_python(tmp_path), [sys.executable, "-c", "import sys; sys.stdout.write('y' * 200_000)"])
    assert len(mgr.warnings()) == 1 and "chatty output" in mgr.warnings()[0]
    assert "chatty output" in caplog.text


async def test_quiet_task_does_not_warn(tmp_path: Path) -> None:
    mgr = manager(tmp_path)
    await run(mgr, own_python(tmp_path), [sys.executable, "-c", "print('hello')"])
    assert mgr.warnings() == []


def test_rate_watch_measures_the_window() -> None:
    now = [0.0]
    rate = RateWatch(window=10.0, clock=lambda: now[0])
    for _ in range(10):
        now[0] += 1.0
        value = rate.add(1000)
    assert value == pytest.approx(1000.0)
    now[0] += 100.0
    assert rate.add(10) == pytest.approx(1.0)  # old bytes left the window


async def test_secret_values_are_masked_in_task_output(tmp_path: Path) -> None:
    mgr = manager(tmp_path)
    code = "import os; print('key=' + os.environ['API_KEY']); print('plain=' + os.environ['PLAIN'])"
    task = await run(
        mgr,
        own_python(tmp_path),
        [sys.executable, "-c", code],
        env={"API_KEY": "sk-live-123456789", "PLAIN": "visible-value"},
        secret_env=["API_KEY"],
    )
    out = task.log_path("stdout").read_text()
    assert "sk-live-123456789" not in out
    assert f"key={MASK}" in out and "plain=visible-value" in out
    assert "sk-live-123456789" not in json.dumps(task.record.public())


async def test_config_secret_env_from_the_agents_environment(tmp_path: Path) -> None:
    mgr = TaskManager(TaskConfig(), tmp_path / "tasks", Redactor(), secret_env_names=["DB_PASSWORD"])
    request = TaskRequest.from_json({"argv": [sys.executable, "-c", "import os; print(os.environ['DB_PASSWORD'])"]})
    base = {"PATH": os.environ["PATH"], "DB_PASSWORD": "hunter2-hunter2"}
    task = await mgr.start(request, own_python(tmp_path), base)
    await task.done.wait()
    assert task.log_path("stdout").read_text() == f"{MASK}\n"


@given(
    prefix=st.text(alphabet="ab \n", max_size=30),
    suffix=st.text(alphabet="ab \n", max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=80), max_size=6),
)
def test_stream_redactor_masks_secrets_split_across_chunks(prefix: str, suffix: str, cuts: list[int]) -> None:
    secret = "s3cr3t-VALUE"
    data = (prefix + secret + suffix + secret).encode()
    masker = StreamRedactor(Redactor([secret]))
    pieces, last = [], 0
    for cut in sorted({min(c, len(data)) for c in cuts}):
        pieces.append(data[last:cut])
        last = cut
    pieces.append(data[last:])
    out = b"".join(masker.feed(p) for p in pieces) + masker.flush()
    assert out == data.replace(secret.encode(), MASK.encode())


async def test_interrupt_kills_the_whole_process_group(tmp_path: Path) -> None:
    mgr = manager(tmp_path)
    code = "import subprocess, time; p = subprocess.Popen(['sleep', '300']); print(p.pid, flush=True); time.sleep(300)"
    request = TaskRequest.from_json({"argv": [sys.executable, "-c", code]})
    task = await mgr.start(request, own_python(tmp_path), {"PATH": os.environ["PATH"]})
    for _ in range(100):
        if read_log(task.log_path("stdout"), 0, 100).strip():  # the log is made by the first byte
            break
        await asyncio.sleep(0.05)
    child = int(task.log_path("stdout").read_text())
    await mgr.interrupt_all(grace=5)
    assert task.record.state == TaskState.INTERRUPTED
    assert task.record.ended_at is not None
    await asyncio.sleep(0.2)
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE


async def test_records_survive_a_restart_and_running_ones_become_lost(tmp_path: Path) -> None:
    mgr = manager(tmp_path)
    done = await run(mgr, own_python(tmp_path), ["true"])
    request = TaskRequest.from_json({"argv": ["sleep", "300"]})
    running = await mgr.start(request, own_python(tmp_path), {"PATH": os.environ["PATH"]})
    # The agent "dies": a new manager reads the same directory.
    again = manager(tmp_path)
    assert again.get(done.record.id) is not None and again.get(done.record.id).record.exit_code == 0  # type: ignore[union-attr]
    lost = again.get(running.record.id)
    assert lost is not None and lost.record.state == TaskState.LOST and lost.done.is_set()
    await mgr.interrupt_all(grace=2)


@pytest.mark.parametrize(
    ("body", "word"),
    [
        ({}, "argv"),
        ({"argv": [1]}, "argv"),
        ({"argv": ["x"], "cwd": 3}, "cwd"),
        ({"argv": ["x"], "secret_env": "A"}, "secret_env"),
        ([], "JSON object"),
        ({"argv": ["a\0b"]}, "NUL"),
        ({"argv": ["x"], "env": {"K\0": "v"}}, "env"),
        ({"argv": ["x"], "env": {"K=1": "v"}}, "env"),
        ({"argv": ["x"], "cwd": "a\0"}, "NUL"),
    ],
)
def test_request_validation(body: object, word: str) -> None:
    with pytest.raises(TaskError, match=word):
        TaskRequest.from_json(body)


def test_task_cwd_stays_inside_the_work_dir(tmp_path: Path) -> None:
    from rawvm_agent.tasks import task_cwd

    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "out").symlink_to(tmp_path)
    assert task_cwd(work, "") == work.resolve()
    assert task_cwd(work, "sub/../sub") == (work / "sub").resolve()
    for cwd in ("../../..", "..", "/", str(tmp_path), "out", "sub/../../work/../.."):
        with pytest.raises(TaskError, match="outside the work dir"):
            task_cwd(work, cwd)
