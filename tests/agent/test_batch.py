"""The agent's batch queue (rawvm_agent.batch) in process: a real Agent running its share of a staged spec."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from hypothesis import given
from hypothesis import strategies as st
from rawvm_agent.app import Agent
from rawvm_agent.batch import BatchError, BatchSpec, share_of
from rawvm_agent.batch_results import read_results

from tests.agent.app_helpers import AUTH, ServeAgent, get_json
from tests.agent.core_helpers import agent_config

Factory = Callable[..., Awaitable[tuple[Agent, TestClient[Any, Any]]]]

# Prints its id and value; fails its first attempt when its id is in FAIL_ONCE, sleeps SLEEP seconds.
TASK = (
    "import os, sys, time; e = os.environ; print('id', e['RAWVM_TASK_ID'], e['RAWVM_TASK_COUNT'], "
    "e.get('RAWVM_TASK_VALUE', '-')); time.sleep(float(e.get('SLEEP', '0') or 0)); "
    "sys.exit(3 if e['RAWVM_TASK_ID'] in {FAIL} and e['RAWVM_TASK_ATTEMPT'] == '1' else 0)"
)


def spec_json(ids: list[int], machines: int, **kw: Any) -> dict[str, Any]:
    fail = kw.pop("fail", set())
    argv = kw.pop("argv", [sys.executable, "-c", TASK.replace("{FAIL}", repr({str(i) for i in fail} or {"none"}))])
    raw = {
        "format": 1,
        "argv": argv,
        "ids": ids,
        "values": None,
        "machines": machines,
        "tasks_per_machine": 2,
        "max_retries": 1,
        "task_timeout": 0,
    }
    return {**raw, **kw}


@pytest.fixture
def make_agent(tmp_path: Path, serve_agent: ServeAgent) -> Factory:
    made = itertools.count()

    async def make(
        spec: dict[str, Any], *, sha: str | None = None, **overrides: Any
    ) -> tuple[Agent, TestClient[Any, Any]]:
        n = next(made)
        path = tmp_path / f"spec-{n}.json"
        path.write_text(json.dumps(spec))
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if sha is None else sha
        raw = agent_config(tmp_path / f"state-{n}", batch={"spec_url": str(path), "spec_sha256": digest})
        raw.update(overrides)
        return await serve_agent(raw)

    return make


async def batch_status(client: TestClient[Any, Any]) -> dict[str, Any]:
    return await get_json(client, "/v1/batch")


def sink_result_ids(sink: Path) -> list[int]:
    """The ids of every result flushed to a directory sink, once per time it was flushed, sorted."""
    return sorted(r["id"] for flush in sink.glob("*/batch/results") for r in read_results(flush))


async def wait_results(client: TestClient[Any, Any], count: int, timeout: float = 60.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        body = await (await client.get("/v1/batch/results", headers=AUTH)).json()
        if len(body["results"]) >= count:
            results: list[dict[str, Any]] = body["results"]
            return results
        assert time.monotonic() < deadline, f"only {len(body['results'])} of {count} results"
        await asyncio.sleep(0.1)


@given(st.lists(st.integers(0, 10_000), unique=True, min_size=1, max_size=300), st.integers(1, 40))
def test_static_shares_cover_every_id_exactly_once(ids: list[int], machines: int) -> None:
    shares = [share_of(ids, machines, i) for i in range(machines)]
    assert sorted(i for share in shares for i in share) == sorted(ids)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1  # even


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": 2}, "format 1"),
        ({"argv": []}, "argv"),
        ({"ids": [1, 1]}, "repeat"),
        ({"values": ["a"]}, "one string per id"),
        ({"machines": 0}, "machines"),
        ({"task_timeout": -1}, "task_timeout"),
    ],
)
def test_a_bad_spec_is_refused_with_what_is_wrong(change: dict[str, Any], message: str) -> None:
    with pytest.raises(BatchError, match=message):
        BatchSpec.from_json({**spec_json([0, 1], 1), **change})


async def test_a_machine_runs_its_share_retries_and_flushes_results(make_agent: Factory, tmp_path: Path) -> None:
    sink = tmp_path / "sink"
    spec = spec_json(list(range(10, 16)), 2, fail={13}, values=[f"v{i}" for i in range(6)])
    agent, client = await make_agent(spec, machine_id="c-m1", sink=str(sink))
    results = {r["id"]: r for r in await wait_results(client, 3)}
    assert sorted(results) == [11, 13, 15]  # share 1 of 2: ids[1::2]
    assert all(r["state"] == "done" and r["machine"] == "c-m1" for r in results.values())
    assert [len(r["attempts"]) for r in (results[11], results[13], results[15])] == [1, 2, 1]
    assert results[13]["attempts"][0]["exit_code"] == 3 and results[13]["value"] == "v3"
    last = results[13]["attempts"][-1]["task"]
    log = await (await client.get(f"/v1/tasks/{last}/logs", headers=AUTH)).read()
    assert log == b"id 13 6 v3\n"
    body = await batch_status(client)
    assert body["index"] == 1 and body["done"] == 3 and body["queued"] == [] and body["running"] == {}
    assert not agent.batch.pending
    # the queue drained: its results and the logs of every attempt are in the sink at once
    deadline = time.monotonic() + 10
    while len(set(sink_result_ids(sink))) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert set(sink_result_ids(sink)) == {11, 13, 15}
    assert {p.parent.name for p in sink.glob("*/tasks/*/stdout")} >= {a["task"] for a in results[13]["attempts"]}


async def test_a_queue_with_work_left_is_busy(make_agent: Factory) -> None:
    spec = spec_json([0, 1, 2], 1, tasks_per_machine=1)
    agent, client = await make_agent({**spec, "argv": [sys.executable, "-c", "import time; time.sleep(0.4)"]})
    deadline = time.monotonic() + 30
    while not agent.batch.running and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    seen_idle = False
    while agent.batch.pending:
        agent.tick()
        seen_idle |= bool(agent.decision and agent.decision.idle)
        await asyncio.sleep(0.01)
    assert not seen_idle  # never idle between its tasks
    assert len(await wait_results(client, 3)) == 3


async def test_share_and_adoption_over_the_api(make_agent: Factory) -> None:
    spec = spec_json(list(range(9)), 3)
    agent, client = await make_agent(spec, machine_id="host-abc")  # no m<k> in its id: it waits for its share
    deadline = time.monotonic() + 30
    while agent.batch.spec is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    body = await batch_status(client)
    assert body["index"] is None and body["queued"] == [] and not agent.batch.pending
    resp = await client.post("/v1/batch/share", json={"index": 3}, headers=AUTH)
    assert resp.status == 400 and "from 0 to 2" in (await resp.json())["error"]
    assert (await client.post("/v1/batch/share", json={"index": 2}, headers=AUTH)).status == 200
    assert (await client.post("/v1/batch/share", json={"index": 1}, headers=AUTH)).status == 400  # taken
    assert sorted(r["id"] for r in await wait_results(client, 3)) == [2, 5, 8]
    resp = await client.post("/v1/batch/adopt", json={"ids": [0, 2, 42]}, headers=AUTH)
    assert resp.status == 400  # 42 is not a task of this batch
    resp = await client.post("/v1/batch/adopt", json={"ids": [0, 2, 3]}, headers=AUTH)
    assert (await resp.json())["adopted"] == [0, 3]  # 2 is its own already
    assert sorted(r["id"] for r in await wait_results(client, 5)) == [0, 2, 3, 5, 8]


async def test_the_batch_routes_need_the_token(make_agent: Factory) -> None:
    _, client = await make_agent(spec_json([0], 1))
    for method, path in (("GET", "/v1/batch"), ("GET", "/v1/batch/results"), ("POST", "/v1/batch/share")):
        assert (await client.request(method, path)).status == 401
    resp = await client.post("/v1/batch/adopt", json={"ids": [0]}, headers={"Authorization": "Bearer nope"})
    assert resp.status == 401


async def test_a_task_past_its_timeout_is_ended_and_counts_as_failed(make_agent: Factory) -> None:
    spec = spec_json([0], 1, max_retries=0, task_timeout=0.5)
    _, client = await make_agent({**spec, "argv": [sys.executable, "-c", "import time; time.sleep(60)"]})
    (result,) = await wait_results(client, 1, timeout=30)
    assert result["state"] == "failed" and result["exit_code"] == -15
    assert result["attempts"][0]["timed_out"] is True


async def test_a_spec_with_the_wrong_sha256_never_runs_and_leaves_the_machine_idle(make_agent: Factory) -> None:
    agent, client = await make_agent(spec_json([0, 1], 1), sha="0" * 64)
    deadline = time.monotonic() + 30
    while not (await batch_status(client))["error"] and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    body = await batch_status(client)
    assert "sha256" in body["error"] and body["results"] == 0
    assert not agent.batch.pending and not agent.tasks.tasks


async def test_a_restarted_agent_keeps_its_results_and_runs_only_the_rest(
    tmp_path: Path, serve_agent: ServeAgent
) -> None:
    spec = spec_json([0, 1, 2, 3], 1)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    raw = agent_config(tmp_path / "state", batch={"spec_url": str(path)})
    results = tmp_path / "state" / "batch" / "results"
    results.mkdir(parents=True)
    earlier = {"id": 2, "state": "done", "exit_code": 0, "attempts": [], "machine": "m-test", "ended_at": 1.0}
    torn = json.dumps(earlier | {"id": 3})[:25]  # the power went while task 3's line was written
    (results / "000000.jsonl").write_text(json.dumps(earlier) + "\n" + torn)
    agent, client = await serve_agent(raw)
    got = await wait_results(client, 4)
    assert got[0]["id"] == 2 and sorted(r["id"] for r in got) == [0, 1, 2, 3]
    assert len(agent.tasks.tasks) == 3  # task 2 did not run again; 3 did (its result was torn)
    assert (results / "000000.jsonl").read_text().endswith(torn)  # new lines went to a segment of their own
    assert sorted(r["id"] for r in read_results(results)) == [0, 1, 2, 3]


async def test_a_stop_mid_batch_leaves_the_running_tasks_without_result_and_starts_no_more(
    make_agent: Factory, tmp_path: Path
) -> None:
    sink = tmp_path / "sink"
    code = "import os, time; time.sleep(0.05 if os.environ['RAWVM_TASK_ID'] == '0' else 60)"
    spec = {**spec_json([0, 1, 2, 3], 1, tasks_per_machine=2), "argv": [sys.executable, "-c", code]}
    off = tmp_path / "powered-off"
    poweroff = [sys.executable, "-c", f"open({str(off)!r}, 'w').write('off')"]
    idle = {"keepalive": "10m", "window": "1s", "cpu_threshold": 101.0, "poweroff_command": poweroff}
    agent, client = await make_agent(spec, sink=str(sink), idle=idle)
    await wait_results(client, 1)  # task 0 done; 1 and 2 running, 3 queued
    deadline = time.monotonic() + 30
    # both running tasks' processes exist (the runner counts a task as running a moment before its record does)
    while (len(agent.batch.running) < 2 or len(agent.tasks.tasks) < 3) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    started = len(agent.tasks.tasks)
    assert (await client.post("/v1/shutdown", headers=AUTH)).status == 202
    await asyncio.wait_for(agent.stopped.wait(), 30)
    assert len(agent.tasks.tasks) == started == 3  # nothing started after the stop began
    assert sorted(agent.batch.results) == [0]  # 1 and 2 were interrupted: no result, so they show as unfinished
    assert set(sink_result_ids(sink)) == {0}  # the incremental flush and the stop's (which sends everything)
    assert off.read_text() == "off" and agent.batch.stopping  # its loop ended: no spinning on refusals
