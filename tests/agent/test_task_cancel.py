"""``POST /v1/tasks/{id}/cancel`` (Ctrl-C, `rawvm cancel` and gang jobs end tasks with it): the whole process
group ends, SIGTERM first and SIGKILL after the grace, and the output written so far is kept."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from aiohttp.test_utils import TestClient

from tests.agent.app_helpers import AUTH, ServeAgent, get_json
from tests.agent.core_helpers import agent_config

# A parent that starts a child, both printing their pid, then sleeping; the parent ignores SIGTERM when asked.
TREE = """
import os, signal, subprocess, sys, time
if sys.argv[1] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("pids", os.getpid(), child.pid, flush=True)
time.sleep(600)
"""


async def start(client: TestClient[Any, Any], mode: str) -> tuple[str, list[int]]:
    resp = await client.post("/v1/tasks", json={"argv": [sys.executable, "-c", TREE, mode]}, headers=AUTH)
    assert resp.status == 201, await resp.text()
    task_id = str((await resp.json())["id"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        out = await (await client.get(f"/v1/tasks/{task_id}/logs", headers=AUTH)).read()
        if out.startswith(b"pids "):
            return task_id, [int(p) for p in out.split()[1:3]]
        await asyncio.sleep(0.05)
    raise AssertionError("the task never printed its pids")


def gone(pids: list[int]) -> bool:
    return not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


async def test_cancel_ends_the_process_group_and_keeps_the_output(tmp_path: Path, serve_agent: ServeAgent) -> None:
    _, client = await serve_agent(agent_config(tmp_path / "state"))
    task_id, pids = await start(client, "polite")
    began = time.monotonic()
    resp = await client.post(f"/v1/tasks/{task_id}/cancel", headers=AUTH)
    assert resp.status == 200
    body = await resp.json()
    assert time.monotonic() - began < 4  # SIGTERM was enough: no wait for the grace
    assert body["state"] == "cancelled" and body["exit_code"] == -15
    assert gone(pids)
    out = await (await client.get(f"/v1/tasks/{task_id}/logs", headers=AUTH)).read()
    assert out.startswith(b"pids ")
    again = await (await client.post(f"/v1/tasks/{task_id}/cancel", headers=AUTH)).json()
    assert again["state"] == "cancelled"  # cancelling an ended task answers its record again
    assert (await get_json(client, "/v1/status"))["tasks"]["running"] == 0


async def test_a_task_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path, serve_agent: ServeAgent) -> None:
    _, client = await serve_agent(agent_config(tmp_path / "state"))
    task_id, pids = await start(client, "stubborn")
    began = time.monotonic()
    body = await (await client.post(f"/v1/tasks/{task_id}/cancel?grace=1", headers=AUTH)).json()
    assert 0.9 < time.monotonic() - began < 5
    assert body["state"] == "cancelled" and body["exit_code"] == -9
    assert gone(pids)


async def test_cancel_of_an_unknown_task_or_a_bad_grace(tmp_path: Path, serve_agent: ServeAgent) -> None:
    _, client = await serve_agent(agent_config(tmp_path / "state"))
    resp = await client.post("/v1/tasks/nosuch/cancel", headers=AUTH)
    assert resp.status == 404 and "nosuch" in (await resp.json())["error"]
    assert (await client.post("/v1/tasks/nosuch/cancel")).status == 401  # behind the token like the rest
