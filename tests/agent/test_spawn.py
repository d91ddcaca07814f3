"""rawvm_agent.spawn: real processes, waited on through pidfds from the event loop (no thread per child)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from pathlib import Path

import pytest
from rawvm_agent.config import TaskConfig
from rawvm_agent.environment import Environment
from rawvm_agent.logs import Redactor
from rawvm_agent.spawn import PipeReader, spawn
from rawvm_agent.tasks import TaskManager, TaskRequest, TaskState, read_log

ENV = {"PATH": os.environ["PATH"]}


async def drain(pipe: PipeReader) -> bytes:
    out = b""
    while chunk := await pipe.read(1 << 16):
        out += chunk
    pipe.close()
    return out


async def test_exit_code_and_both_pipes(tmp_path: Path) -> None:
    child, out, err = spawn(["sh", "-c", "echo out; echo err >&2; exit 3"], cwd=tmp_path, env=ENV)
    assert await drain(out) == b"out\n" and await drain(err) == b"err\n"
    assert await child.wait() == 3 and child.returncode == 3
    assert await child.wait() == 3  # a second wait answers at once


async def test_no_thread_per_child(tmp_path: Path) -> None:
    threads = threading.active_count()
    started = [spawn(["sleep", "0.3"], cwd=tmp_path, env=ENV) for _ in range(8)]
    await asyncio.sleep(0.1)
    assert threading.active_count() == threads
    codes = await asyncio.gather(*(child.wait() for child, _, _ in started))
    for _, out, err in started:
        out.close()
        err.close()
    assert codes == [0] * 8


async def test_own_session_and_a_signal_is_a_negative_code(tmp_path: Path) -> None:
    child, out, err = spawn(["sleep", "30"], cwd=tmp_path, env=ENV)
    assert os.getpgid(child.pid) == child.pid  # its own process group: killpg reaches its children
    waiting = asyncio.create_task(child.wait())
    await asyncio.sleep(0.05)
    assert child.returncode is None and not waiting.done()
    os.killpg(child.pid, signal.SIGTERM)
    assert await asyncio.wait_for(waiting, 10) == -signal.SIGTERM
    out.close()
    err.close()


async def test_a_cancelled_wait_does_not_lose_the_exit(tmp_path: Path) -> None:
    child, out, err = spawn([sys.executable, "-c", "import time; time.sleep(0.2)"], cwd=tmp_path, env=ENV)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(child.wait(), 0.01)
    assert await asyncio.wait_for(child.wait(), 10) == 0
    out.close()
    err.close()


def test_a_missing_command_raises_and_leaves_no_fds(tmp_path: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(FileNotFoundError):
        spawn(["no-such-command-rawvm"], cwd=tmp_path, env=ENV)
    assert len(os.listdir("/proc/self/fd")) == before


async def test_a_task_whose_caller_keeps_the_record_leaves_files_only_when_it_prints(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    mgr = TaskManager(TaskConfig(), tmp_path / "tasks", Redactor())
    environment = Environment(venv=None, work_dir=work)
    silent = await mgr.start(
        TaskRequest(argv=["true"], env={}, cwd="", secret_env=[]), environment, ENV, own_record=False
    )
    talker = await mgr.start(
        TaskRequest(argv=["sh", "-c", "echo hi >&2"], env={}, cwd="", secret_env=[]), environment, ENV, own_record=False
    )
    await asyncio.wait_for(asyncio.gather(silent.done.wait(), talker.done.wait()), 10)
    assert silent.record.exit_code == 0 and not silent.dir.exists()  # no directory, no record, no empty logs
    assert read_log(silent.log_path("stdout"), 0, 10) == b""
    assert sorted(p.name for p in talker.dir.iterdir()) == ["stderr", "task.json"]
    again = TaskManager(TaskConfig(), tmp_path / "tasks", Redactor())
    assert again.get(silent.record.id) is None
    reloaded = again.get(talker.record.id)
    assert (
        reloaded is not None
        and reloaded.record.state == TaskState.EXITED
        and reloaded.record.bytes_written["stderr"] == 3
    )
