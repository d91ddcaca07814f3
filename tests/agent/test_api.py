"""The agent API (Contract 4), in process: a real Agent (real sampler, idle policy, tasks) behind aiohttp."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from aiohttp.test_utils import TestClient, TestServer
from rawvm_agent.app import Agent
from rawvm_agent.config import config_from_dict
from rawvm_agent.server import create_app
from rawvm_agent.state import Phase, StateStore

from tests.agent.app_helpers import AUTH, ServeAgent, get_json
from tests.agent.core_helpers import agent_config, tiny_bundle
from tests.systools import need_tool

ClientFactory = Callable[..., Awaitable[tuple[Agent, TestClient[Any, Any]]]]


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


@pytest.fixture
def make_client(tmp_path: Path, serve_agent: ServeAgent) -> ClientFactory:
    async def make(**overrides: Any) -> tuple[Agent, TestClient[Any, Any]]:
        return await serve_agent(agent_config(tmp_path / "state", **overrides))

    return make


async def status(client: TestClient[Any, Any]) -> dict[str, Any]:
    return await get_json(client, "/v1/status")


async def run_task(client: TestClient[Any, Any], body: dict[str, Any]) -> dict[str, Any]:
    resp = await client.post("/v1/tasks", json=body, headers=AUTH)
    assert resp.status == 201, await resp.text()
    task_id = (await resp.json())["id"]

    async def ended() -> bool:
        record = await (await client.get(f"/v1/tasks/{task_id}", headers=AUTH)).json()
        return bool(record["state"] != "running")

    await wait_until(ended)
    out: dict[str, Any] = await (await client.get(f"/v1/tasks/{task_id}", headers=AUTH)).json()
    return out


async def test_healthz_says_ok_and_nothing_else(make_client: ClientFactory) -> None:
    _, client = await make_client()
    resp = await client.get("/healthz")
    assert resp.status == 200 and await resp.text() == "ok"


async def test_status_reports_phase_install_idle_tasks_gpus(make_client: ClientFactory) -> None:
    _, client = await make_client()

    async def serving() -> bool:
        return (await status(client))["phase"] in ("ready", "idle", "busy")

    await wait_until(serving)
    body = await status(client)
    assert {"booting", "ready"} <= body["phase_times"].keys()
    assert body["install"]["step"] == "" and body["error"] == ""
    assert body["idle"]["keepalive_s"] == 600.0
    assert body["tasks"]["running"] == 0 and body["tasks"]["total"] == 0
    assert body["gpu_count"] == 0 and body["gpus"] == []  # no NVML library on this machine
    assert body["warnings"] == []
    assert body["machine_id"] == "m-test"


async def test_task_runs_and_reports_exit_code_and_logs(make_client: ClientFactory) -> None:
    _, client = await make_client()
    code = "import os, sys; print('out', os.environ['GREETING']); print('err', file=sys.stderr); sys.exit(5)"
    task = await run_task(client, {"argv": [sys.executable, "-c", code], "env": {"GREETING": "hi"}})
    assert task["state"] == "exited" and task["exit_code"] == 5
    assert task["ended_at"] >= task["started_at"] > 0
    assert task["argv"][0] == sys.executable
    assert "env" not in task

    resp = await client.get(f"/v1/tasks/{task['id']}/logs", headers=AUTH)
    assert await resp.read() == b"out hi\n"
    assert resp.headers["X-Next-Offset"] == "7"
    resp = await client.get(f"/v1/tasks/{task['id']}/logs?stream=stderr", headers=AUTH)
    assert await resp.read() == b"err\n"


async def test_logs_page_by_offset(make_client: ClientFactory) -> None:
    _, client = await make_client()
    task = await run_task(client, {"argv": [sys.executable, "-c", "print('abcdefghij', end='')"]})
    url = f"/v1/tasks/{task['id']}/logs"
    pieces, offset = [], 0
    while True:
        resp = await client.get(f"{url}?offset={offset}&limit=3", headers=AUTH)
        data = await resp.read()
        if not data:
            assert resp.headers["X-Next-Offset"] == str(offset)
            break
        pieces.append(data)
        offset = int(resp.headers["X-Next-Offset"])
    assert pieces == [b"abc", b"def", b"ghi", b"j"]


async def test_follow_streams_until_the_task_ends(make_client: ClientFactory) -> None:
    _, client = await make_client()
    code = "import time\nfor i in range(5):\n    print(i, flush=True)\n    time.sleep(0.2)\n"
    resp = await client.post("/v1/tasks", json={"argv": [sys.executable, "-c", code]}, headers=AUTH)
    task_id = (await resp.json())["id"]
    resp = await client.get(f"/v1/tasks/{task_id}/logs?follow=1&offset=2", headers=AUTH)
    assert resp.headers["X-Next-Offset"] == "2"
    body = await resp.read()  # returns only once the task has ended
    assert body == b"1\n2\n3\n4\n"
    state = (await (await client.get(f"/v1/tasks/{task_id}", headers=AUTH)).json())["state"]
    assert state == "exited"


async def test_task_request_errors_are_one_line(make_client: ClientFactory) -> None:
    _, client = await make_client()
    cases = [
        ({"argv": []}, 400, "argv"),
        ({"argv": "python"}, 400, "argv"),
        ({"argv": ["x"], "env": {"A": 1}}, 400, "env"),
        ({"argv": ["no-such-program-rawvm"]}, 400, "cannot run"),
        ({"argv": ["true"], "cwd": "no/such/dir"}, 400, "cwd"),
    ]
    for body, code, word in cases:
        resp = await client.post("/v1/tasks", json=body, headers=AUTH)
        assert resp.status == code, body
        error = (await resp.json())["error"]
        assert word in error and "\n" not in error
    resp = await client.post("/v1/tasks", data=b"{not json", headers=AUTH)
    assert resp.status == 400
    assert (await client.get("/v1/tasks/nope", headers=AUTH)).status == 404
    assert (await client.get("/v1/tasks/nope/logs", headers=AUTH)).status == 404


async def test_nul_characters_and_cwd_outside_the_work_dir_are_400_not_500(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    """Issue 12's probe found these: NUL in argv or an env key answered 500, and ``cwd: "../../.."`` ran."""
    agent, client = await make_client()
    await wait_until(lambda: _serving(client))
    assert agent.env is not None
    outside = tmp_path / "outside"
    outside.mkdir()
    (agent.env.work_dir / "escape").symlink_to(outside)
    (agent.env.work_dir / "inside").mkdir()
    cases = [
        ({"argv": ["echo", "a\u0000b"]}, "NUL"),
        ({"argv": ["ech\u0000o"]}, "NUL"),
        ({"argv": [""]}, "argv[0]"),
        ({"argv": ["true"], "env": {"A\u0000B": "1"}}, "env"),
        ({"argv": ["true"], "env": {"A=B": "1"}}, "env"),
        ({"argv": ["true"], "env": {"": "1"}}, "env"),
        ({"argv": ["true"], "env": {"A": "x\u0000y"}}, "env"),
        ({"argv": ["true"], "cwd": "../../.."}, "outside the work dir"),
        ({"argv": ["true"], "cwd": "inside/../.."}, "outside the work dir"),
        ({"argv": ["true"], "cwd": "/etc"}, "outside the work dir"),
        ({"argv": ["true"], "cwd": "escape"}, "outside the work dir"),
        ({"argv": ["true"], "cwd": "in\u0000side"}, "NUL"),
        ({"argv": ["true"], "cwd": "x" * 5000}, "cwd"),
        ({"argv": ["/etc/passwd"]}, "cannot run"),  # not executable
    ]
    for body, word in cases:
        resp = await client.post("/v1/tasks", json=body, headers=AUTH)
        error = (await resp.json())["error"]
        assert resp.status == 400, (body, resp.status, error)
        assert word in error and "\n" not in error, (body, error)
    assert agent.tasks.tasks == {}  # none of them ran
    ok = await client.post("/v1/tasks", json={"argv": ["pwd"], "cwd": "inside/../inside"}, headers=AUTH)
    assert ok.status == 201
    nested = b"[" * 100_000 + b"]" * 100_000  # deeper than json's recursion limit
    resp = await client.post("/v1/tasks", data=nested, headers=AUTH)
    assert resp.status == 400 and "JSON" in (await resp.json())["error"]


async def test_aiohttp_errors_are_one_line_json_too(make_client: ClientFactory) -> None:
    _, client = await make_client()
    for method, path, code in [
        ("GET", "/nope", 404),
        ("DELETE", "/v1/status", 405),
        ("PUT", "/v1/tasks", 405),
        ("GET", "/v1/samples?after=x", 400),
    ]:
        resp = await client.request(method, path, headers=AUTH)
        assert resp.status == code, (method, path)
        assert resp.content_type == "application/json"
        error = (await resp.json())["error"]
        assert error and "\n" not in error
    resp = await client.post("/v1/tasks", data=b"x" * (2 << 20), headers=AUTH)
    assert resp.status == 413 and "size" in (await resp.json())["error"]
    resp = await client.request("DELETE", "/v1/status", headers=AUTH)
    assert "GET" in resp.headers["Allow"]


async def _serving(client: TestClient[Any, Any]) -> bool:
    return (await status(client))["phase"] in ("ready", "idle", "busy")


async def test_bad_log_parameters(make_client: ClientFactory) -> None:
    _, client = await make_client()
    task = await run_task(client, {"argv": ["true"]})
    for query in (
        "stream=stdin",
        "offset=-1",
        "offset=x",
        "offset=99999999999999999999999",
        "offset=9223372036854775808",
    ):
        resp = await client.get(f"/v1/tasks/{task['id']}/logs?{query}", headers=AUTH)
        assert resp.status == 400, query


async def test_samples_msgpack_by_default_json_on_request(make_client: ClientFactory) -> None:
    agent, client = await make_client()

    async def has_samples() -> bool:
        return len(agent.sampler.samples_after(-1)) >= 3

    await wait_until(has_samples)
    packed = await client.get("/v1/samples", headers=AUTH)
    assert packed.headers["Content-Type"].startswith("application/msgpack")
    rows = msgpack.unpackb(await packed.read())
    assert len(rows) >= 3 and all("seq" in r for r in rows)
    seqs = [r["seq"] for r in rows]
    assert seqs == sorted(seqs)
    later = await client.get(f"/v1/samples?after={seqs[1]}", headers={**AUTH, "Accept": "application/json"})
    assert later.headers["Content-Type"].startswith("application/json")
    assert all(r["seq"] > seqs[1] for r in await later.json())
    assert (await client.get("/v1/samples?after=abc", headers=AUTH)).status == 400


async def test_metrics_pass_promtool(make_client: ClientFactory) -> None:
    agent, client = await make_client()
    await run_task(client, {"argv": ["true"]})

    async def sampled() -> bool:
        return agent.sampler.latest() is not None

    await wait_until(sampled)
    resp = await client.get("/metrics", headers=AUTH)
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = await resp.text()
    assert 'rawvm_agent_tasks{state="exited"} 1' in text
    assert "rawvm_agent_tasks_started_total 1" in text
    assert "rawvm_cpu_seconds_total" in text  # the sampler's families come first
    promtool = need_tool("promtool", "prometheus")
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


async def test_monitoring_reads_are_not_activity(make_client: ClientFactory) -> None:
    _, client = await make_client()

    async def idle() -> bool:
        return (await status(client))["idle"]["idle_since"] is not None

    await wait_until(idle)
    since = (await status(client))["idle"]["idle_since"]
    for _ in range(5):
        await client.get("/v1/status", headers=AUTH)
        await client.get("/metrics", headers=AUTH)
        await client.get("/v1/samples", headers=AUTH)
        await asyncio.sleep(0.1)
    assert (await status(client))["idle"]["idle_since"] == since


async def test_keepalive_and_running_task_are_activity(make_client: ClientFactory) -> None:
    agent, client = await make_client(idle={"client_timeout": "1h"})
    resp = await client.post("/v1/keepalive", headers=AUTH)
    assert resp.status == 200
    await asyncio.sleep(0.5)
    body = await status(client)
    assert body["phase"] == "busy" and body["idle"]["last_keepalive"] is not None
    assert "keepalive" in body["idle"]["reason"]

    agent.state.last_keepalive = None
    resp = await client.post("/v1/tasks", json={"argv": ["sleep", "30"]}, headers=AUTH)
    await asyncio.sleep(0.5)
    body = await status(client)
    assert body["phase"] == "busy" and "task" in body["idle"]["reason"]
    assert body["tasks"]["running"] == 1 and body["tasks"]["total"] == 1
    assert "ids" not in body["tasks"]  # a count: a big batch's ids would ride along on every status read
    await agent.tasks.interrupt_all(grace=2)


@pytest.mark.slow
async def test_shutdown_interrupts_flushes_and_powers_off(make_client: ClientFactory, tmp_path: Path) -> None:
    marker = tmp_path / "powered-off"
    sink = tmp_path / "sink"
    agent, client = await make_client(
        sink=str(sink),
        idle={"poweroff_command": [sys.executable, "-c", f"open({str(marker)!r}, 'w').write('off')"]},
    )
    resp = await client.post(
        "/v1/tasks",
        json={"argv": [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]},
        headers=AUTH,
    )
    task_id = (await resp.json())["id"]
    await asyncio.sleep(0.5)
    resp = await client.post("/v1/shutdown", headers=AUTH)
    assert resp.status == 202
    await asyncio.wait_for(agent.stopped.wait(), 30)
    assert marker.read_text() == "off"
    body = await status(client)
    assert body["phase"] == "off" and "shutdown" in body["stop_reason"]
    task = await (await client.get(f"/v1/tasks/{task_id}", headers=AUTH)).json()
    assert task["state"] == "interrupted"
    flushed = list(sink.rglob("*"))
    assert any(p.name == "stdout" and p.read_text() == "started\n" for p in flushed)
    assert any(p.name == "state.json" for p in flushed)
    assert any("telemetry" in p.parts for p in flushed if p.is_file())
    resp = await client.post("/v1/tasks", json={"argv": ["true"]}, headers=AUTH)
    assert resp.status == 409


@pytest.mark.slow
async def test_bad_bundle_fails_refuses_tasks_and_still_powers_off(make_client: ClientFactory, tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path / "src")
    (bundle.dir / "code.tar.gz").write_bytes(b"tampered")
    marker = tmp_path / "off"
    agent, client = await make_client(
        bundle=bundle, idle={"keepalive": "1s", "poweroff_command": ["touch", str(marker)]}
    )
    await asyncio.wait_for(agent.stopped.wait(), 30)
    body = await status(client)
    assert body["phase_times"].keys() >= {"installing", "failed", "stopping", "off"}
    assert "sha256" in body["error"] and "code.tar.gz" in body["error"]
    assert marker.exists()
    assert not (tmp_path / "state" / "env").exists() and not (tmp_path / "state" / "work").exists()


async def test_an_unexpected_install_error_still_fails_and_powers_off(
    make_client: ClientFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only InstallError: any exception during install must end in phase failed, or "installing" (busy)
    would keep the machine up until max_lifetime. The bug this guards was a TypeError from an old Python."""
    from rawvm_agent.installer import Installer

    async def broken(self: Installer) -> None:
        raise TypeError("extractall() got an unexpected keyword argument 'filter'")

    monkeypatch.setattr(Installer, "install", broken)
    bundle = tiny_bundle(tmp_path / "src")
    marker = tmp_path / "off"
    agent, client = await make_client(
        bundle=bundle, idle={"keepalive": "1s", "poweroff_command": ["touch", str(marker)]}
    )
    await asyncio.wait_for(agent.stopped.wait(), 30)
    body = await status(client)
    assert "failed" in body["phase_times"]
    assert body["error"].startswith("TypeError: extractall()")
    assert marker.exists()


@pytest.mark.slow
async def test_tasks_wait_for_install(make_client: ClientFactory, tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path / "src")
    _, client = await make_client(bundle=bundle)
    # uv is still building the venv (a subprocess); this in-process request comes first and is refused.
    resp = await client.post("/v1/tasks", json={"argv": ["python", "main.py"]}, headers=AUTH)
    assert resp.status == 409
    assert re.search(r"not ready \(phase (booting|installing)\)", (await resp.json())["error"])

    async def ready() -> bool:
        return (await status(client))["phase"] in ("ready", "idle", "busy")

    await wait_until(ready, timeout=120)
    task = await run_task(client, {"argv": ["python", "main.py"]})
    assert task["exit_code"] == 7
    out = await (await client.get(f"/v1/tasks/{task['id']}/logs", headers=AUTH)).read()
    assert b"hello from tinydep via tinyapp" in out
    assert str(tmp_path / "state" / "env").encode() in out
    body = await status(client)
    assert body["install"]["packages_done"] == 2 and body["install"]["step"] == "done"


@pytest.mark.slow
async def test_restart_resumes_without_reinstalling_or_resetting_idle_clock(tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path / "src")
    raw = agent_config(tmp_path / "state", bundle=bundle)
    first = Agent(config_from_dict(raw))
    async with TestClient(TestServer(create_app(first))) as client:

        async def idle() -> bool:
            return (await status(client))["idle"]["idle_since"] is not None

        await wait_until(idle, timeout=120)
        await asyncio.sleep(0.3)
    saved = StateStore(tmp_path / "state" / "state.json").load()
    assert saved is not None and saved.installed_manifest == bundle.manifest_sha256
    since = saved.idle["idle_since"]
    install_log = (tmp_path / "state" / "install.log").read_text()

    second = Agent(config_from_dict(raw))
    async with TestClient(TestServer(create_app(second))) as client:
        await asyncio.sleep(0.5)
        body = await status(client)
    assert body["restarts"] == 1
    assert body["phase"] == "idle"
    assert body["idle"]["idle_since"] == since
    assert (tmp_path / "state" / "install.log").read_text() == install_log  # uv did not run again


async def test_json_status_is_serialisable_with_stdlib(make_client: ClientFactory) -> None:
    agent, _ = await make_client()
    json.dumps(agent.status())


@pytest.mark.slow
async def test_max_lifetime_stops_a_busy_machine_with_a_warning(
    make_client: ClientFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "off"
    agent, client = await make_client(idle={"max_lifetime": "2s", "poweroff_command": ["touch", str(marker)]})
    resp = await client.post("/v1/tasks", json={"argv": ["sleep", "300"]}, headers=AUTH)
    task_id = (await resp.json())["id"]
    await asyncio.wait_for(agent.stopped.wait(), 30)
    assert marker.exists()
    assert agent.state.stop_reason.startswith("max_lifetime") and "busy" in agent.state.stop_reason
    assert "stopping although busy" in caplog.text
    task = await (await client.get(f"/v1/tasks/{task_id}", headers=AUTH)).json()
    assert task["state"] == "interrupted"


async def test_a_stop_interrupted_by_an_agent_crash_resumes_on_restart(tmp_path: Path) -> None:
    marker = tmp_path / "off"
    raw = agent_config(tmp_path / "state", idle={"poweroff_command": ["touch", str(marker)]})
    first = Agent(config_from_dict(raw))
    first.state.enter(first.state.phase.STOPPING, time.time())
    first.state.stop_reason = "idle for 20m >= 20m"
    first.save_state()  # the agent died here, between deciding to stop and powering off

    second = Agent(config_from_dict(raw))
    async with TestClient(TestServer(create_app(second))):
        await asyncio.wait_for(second.stopped.wait(), 30)
    assert marker.exists()
    assert second.state.phase == "off" and second.state.stop_reason == "idle for 20m >= 20m"


async def test_after_a_reboot_the_idle_clock_and_lifetime_start_over(tmp_path: Path) -> None:
    raw = agent_config(tmp_path / "state")
    first = Agent(config_from_dict(raw))
    first.state.enter(first.state.phase.OFF, time.time() - 3600)
    first.state.started_at = time.time() - 7200
    first.boot_id = "an-earlier-boot"
    first.save_state()

    second = Agent(config_from_dict(raw))
    async with TestClient(TestServer(create_app(second))) as client:
        await asyncio.sleep(0.5)
        body = await status(client)
    assert body["phase"] in ("ready", "idle", "busy")
    assert body["started_at"] > time.time() - 60
    assert not second.stopped.is_set()


async def test_a_handed_sink_form_is_kept_private_redacted_and_used_to_flush(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    """``PUT /v1/sink``: the laptop hands the machine its own presigned POST. The agent keeps it 0600 (reloaded
    after a restart), never flushes it, never logs its signing values, and POSTs its flush with it; without it an
    agent whose agent.toml names no sink keeps its logs."""
    agent, client = await make_client()
    assert agent.sink_target() == ("", {})
    for bad in ({"url": "file:///etc", "fields": {"key": "k"}}, {"url": "https://s3.example/", "fields": {}}, []):
        resp = await client.put("/v1/sink", json=bad, headers=AUTH)
        assert resp.status == 400
    assert (await client.put("/v1/sink", json={}, headers={})).status == 401
    signature = "c2lnbmF0dXJlLW9mLXRoaXMtbWFjaGluZXMtZm9ybQ"
    form = {
        "key": "clusters/c/sink/i-1/${filename}",
        "policy": "cG9saWN5LW9mLXRoaXMtbWFjaGluZQ",
        "x-amz-signature": signature,
    }
    resp = await client.put("/v1/sink", json={"url": "https://bucket.s3.example/", "fields": form}, headers=AUTH)
    assert resp.status == 200, await resp.text()
    assert agent.sink_target() == ("https://bucket.s3.example/", form) and agent.http_sink()
    kept = tmp_path / "state" / ".sink-post.json"
    assert kept.stat().st_mode & 0o777 == 0o600 and kept not in agent.sink_files()
    assert agent.redactor.redact(f"oops {signature}") == "oops ***"
    again = Agent(agent.config)  # a restarted agent still has it
    assert again.handed_sink is not None and again.handed_sink.fields == form


async def test_a_status_read_can_wait_for_the_phase_to_change(make_client: ClientFactory) -> None:
    agent, client = await make_client()
    await wait_until(lambda: _phase_is(client, "idle"))
    started = time.monotonic()
    held = await get_json(client, "/v1/status?phase=idle&wait=0.3")  # no change: answered after the wait
    assert held["phase"] == "idle" and time.monotonic() - started >= 0.25
    waiting = asyncio.ensure_future(get_json(client, "/v1/status?phase=idle&wait=30"))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    started = time.monotonic()
    agent.set_phase(Phase.BUSY)  # the phase changes (as a task starts): the held read answers at once
    changed = await asyncio.wait_for(waiting, 10)
    assert changed["phase"] == "busy" and time.monotonic() - started < 5
    started = time.monotonic()
    at_once = await get_json(client, "/v1/status?phase=idle&wait=30")  # already another phase: no wait
    assert at_once["phase"] == "busy" and time.monotonic() - started < 5
    bad = await client.get("/v1/status?phase=idle&wait=soon", headers=AUTH)
    assert bad.status == 400 and "wait" in (await bad.json())["error"]


async def _phase_is(client: TestClient[Any, Any], phase: str) -> bool:
    return (await status(client))["phase"] == phase
