"""The agent's call queue (calls.py) in process: a real Agent serving on a real port, real call workers (this
interpreter: an agent without a bundle runs tasks with it, and it has cloudpickle), no network."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import cloudpickle
import pytest
from aiohttp import web
from rawvm_agent import calls
from rawvm_agent.app import Agent
from rawvm_agent.call_worker import ERROR, LOST, OK, pack, unpack
from rawvm_agent.config import config_from_dict
from rawvm_agent.server import create_app

from tests.agent.core_helpers import TOKEN, agent_config

AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Running:
    def __init__(self, agent: Agent, url: str, session: aiohttp.ClientSession) -> None:
        self.agent, self.url, self.session = agent, url, session

    async def submit(self, frames: list[tuple[int, int, bytes]], slots: int = 2, client: str = "c1") -> int:
        async with self.session.post(
            f"{self.url}/v1/calls", params={"client": client, "slots": str(slots)}, data=pack(frames), headers=AUTH
        ) as resp:
            assert resp.status == 202, await resp.text()
            queued: int = (await resp.json())["queued"]
            return queued

    async def results(self, count: int, client: str = "c1", timeout: float = 30) -> dict[int, tuple[int, bytes]]:
        got: dict[int, tuple[int, bytes]] = {}
        deadline = time.monotonic() + timeout
        while len(got) < count:
            assert time.monotonic() < deadline, f"only {len(got)} of {count} results"
            async with self.session.get(
                f"{self.url}/v1/calls/results", params={"client": client, "wait": "5"}, headers=AUTH
            ) as resp:
                assert resp.status == 200
                got.update({i: (status, payload) for i, status, payload in unpack(await resp.read())})
        return got

    async def status(self) -> dict[str, Any]:
        async with self.session.get(f"{self.url}/v1/status", headers=AUTH) as resp:
            body: dict[str, Any] = await resp.json()
            return body


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    async with serve_running(tmp_path) as serving:
        yield serving


@contextlib.asynccontextmanager
async def serve_running(tmp_path: Path, **overrides: Any) -> AsyncIterator[Running]:
    """A real agent on its configured loopback port (its call workers connect there), ready for calls."""
    # The power-off of a stop (test_bad_requests_are_refused shuts down) must not end pytest: a harmless command.
    raw = agent_config(tmp_path / "state", idle={"poweroff_command": ["true"]}, **overrides)
    config = config_from_dict(raw)
    agent = Agent(config)
    runner = web.AppRunner(create_app(agent))
    await runner.setup()
    await web.TCPSite(runner, config.bind, config.port).start()
    async with aiohttp.ClientSession() as session:
        running = Running(agent, f"http://{config.bind}:{config.port}", session)
        deadline = time.monotonic() + 30
        while (await running.status())["phase"] not in ("ready", "idle", "busy"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        try:
            yield running
        finally:
            await agent.tasks.interrupt_all(grace=2)
            await runner.cleanup()


def call(fn: Callable[..., Any], *args: Any) -> bytes:
    return bytes(cloudpickle.dumps((cloudpickle.dumps(fn), args, {})))


async def test_calls_run_in_long_running_workers_and_results_come_back(running: Running) -> None:
    frames = [(i, 0, call(lambda x: (x * 3, __import__("os").getpid()), i)) for i in range(200)]
    assert await running.submit(frames, slots=2) == 200
    results = await running.results(200)
    values = {i: cloudpickle.loads(payload) for i, (status, payload) in results.items() if status == OK}
    assert {i: v[0] for i, v in values.items()} == {i: 3 * i for i in range(200)}
    pids = {v[1] for v in values.values()}
    assert 1 <= len(pids) <= 2  # 200 calls, at most two worker processes: no process per call
    workers = [t for t in running.agent.tasks.running if "worker.py" in t.record.argv[-1]]
    assert len(workers) == 2 and {t.record.pid for t in workers} >= pids
    async with running.session.get(f"{running.url}/v1/calls", headers=AUTH) as resp:
        stats = await resp.json()
    assert stats == {"queued": 0, "running": 0, "results_waiting": 0, "workers": 2, "slots": 2, "done_total": 200}


async def test_a_remote_exception_comes_back_with_its_type_and_traceback(running: Running) -> None:
    def boom(x: int) -> int:
        raise KeyError(f"no {x}")

    await running.submit([(1, 0, call(boom, 5))])
    status, payload = (await running.results(1))[1]
    assert status == ERROR
    exc, type_name, message, text = cloudpickle.loads(payload)
    assert isinstance(exc, KeyError) and type_name == "builtins.KeyError" and message == "'no 5'"
    # boom travelled by value (cloudpickle names its file <dynamic-code>); the worker's own frame is left out
    assert ", in boom" in text and "KeyError: 'no 5'" in text and "run_call" not in text


async def test_calls_in_flight_keep_the_machine_busy_idle_workers_do_not(running: Running) -> None:
    slow_square = lambda x: (__import__("time").sleep(1.5), x * x)[1]  # noqa: E731 (by value: no test module there)
    await running.submit([(1, 0, call(slow_square, 7))], slots=1)
    await asyncio.sleep(0.6)
    busy = await running.status()
    assert busy["phase"] == "busy" and "task" in busy["idle"]["reason"]
    status, payload = (await running.results(1))[1]
    assert (status, cloudpickle.loads(payload)) == (OK, 49)
    deadline = time.monotonic() + 10
    while (await running.status())["phase"] != "idle":
        assert time.monotonic() < deadline, "an idle call worker kept the machine busy"
        await asyncio.sleep(0.1)
    assert running.agent.tasks.running  # the worker still runs, waiting for calls


async def test_a_dead_worker_fails_only_its_calls_and_is_replaced(running: Running) -> None:
    await running.submit([(1, 0, call(lambda code: __import__("os")._exit(code), 4))], slots=1)
    status, payload = (await running.results(1))[1]
    assert status == LOST and b"exit code 4" in payload
    await running.submit([(2, 0, call(lambda x: x + 1, 1))], slots=1)
    status, payload = (await running.results(1))[2]
    assert (status, cloudpickle.loads(payload)) == (OK, 2)


async def test_results_are_kept_per_client(running: Running) -> None:
    await running.submit([(1, 0, call(lambda: "a"))], client="alice")
    await running.submit([(1, 0, call(lambda: "b"))], client="bob")
    assert cloudpickle.loads((await running.results(1, client="bob"))[1][1]) == "b"
    assert cloudpickle.loads((await running.results(1, client="alice"))[1][1]) == "a"


async def test_bad_requests_are_refused(running: Running) -> None:
    session, url = running.session, running.url
    async with session.post(f"{url}/v1/calls", params={"client": "c"}, data=pack([(1, 0, b"x")])) as resp:
        assert resp.status == 401  # no token
    async with session.post(f"{url}/v1/calls", params={"client": "c"}, data=b"\x00\x01", headers=AUTH) as resp:
        assert resp.status == 400 and "bad call batch" in (await resp.json())["error"]
    async with session.post(f"{url}/v1/calls", data=pack([(1, 0, b"x")]), headers=AUTH) as resp:
        assert resp.status == 400 and "client" in (await resp.json())["error"]
    async with session.post(f"{url}/v1/calls/work", params={"worker": "nobody"}, data=b"", headers=AUTH) as resp:
        assert resp.status == 404
    # Over the cap: refused from the Content-Length, before a byte of the body is read.
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"POST /v1/calls?client=c HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Length: {calls.MAX_REQUEST_BYTES + 1}\r\n\r\n".encode()
    )
    assert (await reader.readline()).split()[1] == b"413"
    writer.close()


async def test_a_stopping_machine_takes_no_calls(running: Running) -> None:
    session, url = running.session, running.url
    async with session.post(f"{url}/v1/shutdown", headers=AUTH) as resp:
        assert resp.status == 202
    async with session.post(f"{url}/v1/calls", params={"client": "c"}, data=pack([(1, 0, b"x")]), headers=AUTH) as resp:
        assert resp.status == 409  # a stopping machine takes no calls


def returns_bytes(size: int) -> bytes:
    return call(lambda n: b"r" * n, size)


async def test_results_held_for_a_client_beyond_its_cap_refuse_its_new_calls(tmp_path: Path) -> None:
    """Results wait in memory until their client fetches them: past ``limits.call_result_bytes`` for one client,
    its new calls are a 429 until it does; other clients are not held up."""
    async with serve_running(tmp_path, limits={"call_result_bytes": 1000}) as running:
        await running.submit([(1, 0, returns_bytes(5000))], slots=1)
        deadline = time.monotonic() + 60
        while running.agent.calls.result_bytes.get("c1", 0) < 1000:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        params = {"client": "c1", "slots": "1"}
        data = pack([(2, 0, returns_bytes(1))])
        async with running.session.post(f"{running.url}/v1/calls", params=params, data=data, headers=AUTH) as resp:
            assert resp.status == 429 and "fetch them first" in (await resp.json())["error"]
        assert await running.submit([(3, 0, returns_bytes(1))], slots=1, client="c2") == 1  # the cap is per client
        assert set(await running.results(1)) == {1}
        assert running.agent.calls.result_bytes.get("c1", 0) == 0
        assert await running.submit([(4, 0, returns_bytes(1))], slots=1) == 1
