"""The agent API's caps (``[limits]``: tasks kept and running, log follows) and its strict numeric query
parameters, on a real Agent behind aiohttp's test server. The cap on call results held per client is in
test_calls.py, whose agents serve on the port their call workers connect to."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from rawvm_agent.app import Agent
from rawvm_agent.call_worker import pack
from rawvm_agent.config import LimitsConfig, config_from_dict

from tests.agent.app_helpers import AUTH, ServeAgent
from tests.agent.core_helpers import agent_config

Client = TestClient[Any, Any]


async def serving(serve_agent: ServeAgent, tmp_path: Path, **limits: int) -> tuple[Agent, Client]:
    agent, client = await serve_agent(agent_config(tmp_path / "state", limits=limits))
    deadline = time.monotonic() + 30
    while (await (await client.get("/v1/status", headers=AUTH)).json())["phase"] not in ("ready", "idle", "busy"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    return agent, client


async def one_line_error(resp: ClientResponse, status: int) -> str:
    assert resp.status == status, await resp.text()
    error = (await resp.json())["error"]
    assert isinstance(error, str) and error and "\n" not in error
    return error


async def start(client: Client, *argv: str) -> str:
    resp = await client.post("/v1/tasks", json={"argv": list(argv)}, headers=AUTH)
    assert resp.status == 201, await resp.text()
    task_id: str = (await resp.json())["id"]
    return task_id


async def ended(agent: Agent, task_id: str) -> None:
    task = agent.tasks.get(task_id)
    assert task is not None
    await asyncio.wait_for(task.done.wait(), 30)


def test_the_limits_are_generous_by_default_and_read_from_agent_toml() -> None:
    assert LimitsConfig().tasks_kept >= 10_000 and LimitsConfig().log_follows >= 64
    assert LimitsConfig().call_result_bytes >= 1 << 30
    raw = agent_config(Path("/tmp/x"), limits={"tasks_kept": 3, "log_follows": 2})
    assert config_from_dict(raw).limits == LimitsConfig(tasks_kept=3, log_follows=2)


async def test_tasks_beyond_the_kept_and_running_caps_are_429(serve_agent: ServeAgent, tmp_path: Path) -> None:
    agent, client = await serving(serve_agent, tmp_path, tasks_kept=3, tasks_running=1)
    slow = await start(client, "sleep", "1")
    error = await one_line_error(await client.post("/v1/tasks", json={"argv": ["true"]}, headers=AUTH), 429)
    assert "1 tasks are running" in error
    await ended(agent, slow)
    await ended(agent, await start(client, "true"))
    await ended(agent, await start(client, "true"))
    error = await one_line_error(await client.post("/v1/tasks", json={"argv": ["true"]}, headers=AUTH), 429)
    assert "at most 3 tasks" in error


async def test_concurrent_log_follows_beyond_the_cap_are_429(serve_agent: ServeAgent, tmp_path: Path) -> None:
    _, client = await serving(serve_agent, tmp_path, log_follows=1)
    task_id = await start(client, "sh", "-c", "echo one; sleep 1; echo two")
    first = await client.get(f"/v1/tasks/{task_id}/logs?follow=1", headers=AUTH)
    assert first.status == 200
    error = await one_line_error(await client.get(f"/v1/tasks/{task_id}/logs?follow=1", headers=AUTH), 429)
    assert "log streams" in error
    plain = await client.get(f"/v1/tasks/{task_id}/logs", headers=AUTH)  # a plain read is not a follow
    assert plain.status == 200
    assert await first.read() == b"one\ntwo\n"  # the stream ends with the task: its place is free again
    again = await client.get(f"/v1/tasks/{task_id}/logs?follow=1", headers=AUTH)
    assert again.status == 200 and await again.read() == b"one\ntwo\n"


STRICT = ["²", "١٢", "1_0", "+1", " 1", "1 ", "0x10", "1e3", "nan", "inf", "-", "1.5", "\uff19"]  # last: fullwidth 9


@pytest.mark.parametrize("value", STRICT)
async def test_numeric_query_parameters_are_ascii_digits_or_400(
    serve_agent: ServeAgent, tmp_path: Path, value: str
) -> None:
    """``int()`` takes Unicode digits, '_' and spaces, and ``"²".isdigit()`` is True though ``int("²")`` fails
    (once a 500): every numeric parameter is matched whole against ASCII digits first."""
    agent, client = await serving(serve_agent, tmp_path)
    task_id = await start(client, "true")
    paths = [
        "/v1/samples?after={}",
        "/v1/samples?limit={}",
        f"/v1/tasks/{task_id}/logs?offset={{}}",
        f"/v1/tasks/{task_id}/logs?limit={{}}",
        "/v1/batch/results?after={}",
    ]
    for path in paths:
        await one_line_error(await client.get(path.format(value), headers=AUTH, params=None), 400)
    slots = await client.post("/v1/calls", params={"client": "c1", "slots": value}, data=pack([]), headers=AUTH)
    await one_line_error(slots, 400)
    if value not in ("1e3", "1.5"):  # a number of seconds: str(float) may write these
        wait = await client.get("/v1/calls/results", params={"client": "c1", "wait": value}, headers=AUTH)
        await one_line_error(wait, 400)
    await ended(agent, task_id)


async def test_well_formed_numbers_still_work(serve_agent: ServeAgent, tmp_path: Path) -> None:
    _, client = await serving(serve_agent, tmp_path)
    for path in ("/v1/samples?after=-1&limit=5", "/v1/batch/results?after=0", "/v1/batch/results?after=12"):
        assert (await client.get(path, headers=AUTH)).status == 200, path
    for wait in ("0", "0.25", "1e-05"):
        resp = await client.get("/v1/calls/results", params={"client": "c1", "wait": wait}, headers=AUTH)
        assert resp.status == 200, wait
