"""The routes that steer running tasks and what later ones inherit (task_control.py), and fresh code on a warm
machine (code_sync.py): a real Agent behind aiohttp, real task processes."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import tarfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiohttp.test_utils import TestClient
from rawvm_agent.app import Agent

from tests.agent.app_helpers import AUTH, ServeAgent, get_json
from tests.agent.core_helpers import agent_config, tiny_bundle

Client = TestClient[Any, Any]
SECRET = "hunter2-Very-Secret-value"


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def serving(serve_agent: ServeAgent, state: Path, **overrides: Any) -> tuple[Agent, Client]:
    agent, client = await serve_agent(agent_config(state, **overrides))

    async def ready() -> bool:
        return (await get_json(client, "/v1/status"))["phase"] in ("ready", "idle", "busy")

    await wait_until(ready)
    return agent, client


async def start(client: Client, argv: list[str], **body: Any) -> str:
    resp = await client.post("/v1/tasks", json={"argv": argv, **body}, headers=AUTH)
    assert resp.status == 201, await resp.text()
    return str((await resp.json())["id"])


async def ended(client: Client, task_id: str) -> dict[str, Any]:
    async def done() -> bool:
        return (await get_json(client, f"/v1/tasks/{task_id}"))["state"] != "running"

    await wait_until(done)
    return await get_json(client, f"/v1/tasks/{task_id}")


async def stdout(client: Client, task_id: str) -> str:
    resp = await client.get(f"/v1/tasks/{task_id}/logs", headers=AUTH)
    return await resp.text()


async def test_cancel_kills_the_process_group_and_keeps_the_output(serve_agent: ServeAgent, tmp_path: Path) -> None:
    agent, client = await serving(serve_agent, tmp_path / "state")
    code = "import subprocess, time; subprocess.Popen(['sleep', '600']); print('started', flush=True); time.sleep(600)"
    task_id = await start(client, ["python3", "-c", code])

    async def printed() -> bool:
        return "started" in await stdout(client, task_id)

    await wait_until(printed)
    task = agent.tasks.get(task_id)
    assert task is not None and task.process is not None
    group = [p for p in psutil.process_iter() if _pgid(p) == task.process.pid]
    assert len(group) == 2  # the task and its child

    began = time.monotonic()
    resp = await client.post(f"/v1/tasks/{task_id}/cancel", headers=AUTH)
    assert resp.status == 200
    record = await resp.json()
    assert time.monotonic() - began < 5
    assert record["state"] == "cancelled" and record["exit_code"] == -15
    assert await stdout(client, task_id) == "started\n"
    await asyncio.sleep(0.2)
    assert not [p for p in group if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    again = await client.post(f"/v1/tasks/{task_id}/cancel", headers=AUTH)  # harmless twice
    assert again.status == 200 and (await again.json())["state"] == "cancelled"
    assert (await get_json(client, "/v1/status"))["tasks"]["cancelled"] == 1


def _pgid(proc: psutil.Process) -> int:
    try:
        return os.getpgid(proc.pid)
    except (OSError, psutil.Error):
        return -1


async def test_cancel_kills_a_task_that_ignores_sigterm_after_the_grace(
    serve_agent: ServeAgent, tmp_path: Path
) -> None:
    _, client = await serving(serve_agent, tmp_path / "state")
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(600)"
    )
    task_id = await start(client, ["python3", "-c", code])

    async def printed() -> bool:
        return "up" in await stdout(client, task_id)

    await wait_until(printed)
    resp = await client.post(f"/v1/tasks/{task_id}/cancel?grace=0.5", headers=AUTH)
    record = await resp.json()
    assert record["state"] == "cancelled" and record["exit_code"] == -9


async def test_cancel_of_an_unknown_task_is_404(serve_agent: ServeAgent, tmp_path: Path) -> None:
    _, client = await serving(serve_agent, tmp_path / "state")
    resp = await client.post("/v1/tasks/nosuch/cancel", headers=AUTH)
    assert resp.status == 404
    resp = await client.post("/v1/tasks/nosuch/cancel")  # no token: refused before anything
    assert resp.status == 401


async def test_env_handed_reaches_later_tasks_with_secrets_masked(serve_agent: ServeAgent, tmp_path: Path) -> None:
    state = tmp_path / "state"
    _, client = await serving(serve_agent, state)
    resp = await client.put(
        "/v1/env", json={"env": {"PLAIN": "visible", "TOKEN": SECRET}, "secret_env": ["TOKEN"]}, headers=AUTH
    )
    assert resp.status == 200
    assert SECRET not in await resp.text()
    code = "import hashlib, os; print(os.environ['PLAIN'], os.environ['TOKEN'])"
    task_id = await start(client, ["python3", "-c", code])
    assert (await ended(client, task_id))["exit_code"] == 0
    assert await stdout(client, task_id) == "visible ***\n"
    digest = "import hashlib, os; print(hashlib.sha256(os.environ['TOKEN'].encode()).hexdigest())"
    task_id = await start(client, ["python3", "-c", digest])
    await ended(client, task_id)
    assert (await stdout(client, task_id)).strip() == hashlib.sha256(SECRET.encode()).hexdigest()
    held = [p for p in state.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert held == []


@pytest.mark.parametrize(
    "body",
    [[], {"env": {"A": 1}}, {"env": {"A=B": "x"}}, {"secret_env": "TOKEN"}, {"env": {"A": "x\0"}}],
)
async def test_bad_env_is_one_line_400(serve_agent: ServeAgent, tmp_path: Path, body: Any) -> None:
    _, client = await serving(serve_agent, tmp_path / "state")
    resp = await client.put("/v1/env", json=body, headers=AUTH)
    assert resp.status == 400
    assert set(await resp.json()) == {"error"}


def tar_of(files: dict[str, str], *, evil: str = "") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
        if evil:
            link = tarfile.TarInfo("link")
            link.type, link.linkname = tarfile.SYMTYPE, evil
            tar.addfile(link)
    return buffer.getvalue()


@pytest.mark.slow
async def test_code_sync_lists_what_was_received_and_takes_changes(serve_agent: ServeAgent, tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path / "src")
    _, client = await serving(serve_agent, tmp_path / "state", bundle=bundle)
    files = (await get_json(client, "/v1/code"))["files"]
    work = tmp_path / "state" / "work"
    assert files.keys() == {"main.py", "data/input.txt"}  # the bundle's code archive
    assert files["main.py"] == hashlib.sha256((work / "main.py").read_bytes()).hexdigest()

    new = "print('fresh code')\n"
    resp = await client.post("/v1/code", data=tar_of({"main.py": new, "pkg/extra.py": "X = 1\n"}), headers=AUTH)
    assert resp.status == 200, await resp.text()
    assert (await resp.json()) == {"files": 2}
    files = (await get_json(client, "/v1/code"))["files"]
    assert files["main.py"] == hashlib.sha256(new.encode()).hexdigest() and "pkg/extra.py" in files
    task_id = await start(client, ["python", "main.py"])
    await ended(client, task_id)
    assert await stdout(client, task_id) == "fresh code\n"

    for bad in (b"not a tar", tar_of({"../escape.py": "x"}), tar_of({}, evil="/etc/passwd")):
        resp = await client.post("/v1/code", data=bad, headers=AUTH)
        assert resp.status == 400, await resp.text()
    assert not (tmp_path / "state" / "escape.py").exists()
