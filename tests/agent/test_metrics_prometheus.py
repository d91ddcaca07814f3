"""/metrics of the real agent app (rawvm_agent.server.create_app) against the real Prometheus tools.

``promtool check metrics`` (Debian package prometheus) must accept the page as rendered, on this machine and
with 8 GPUs (NVML's C library faked as in test_nvml.py: ``pynvml.nvmlLib`` replaced, the real nvidia-ml-py
wrappers running). A real Prometheus server on loopback scrapes the agent with its bearer token and reports
the target up; a job with a wrong token is refused (401).
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer
from rawvm_agent.app import Agent
from rawvm_agent.config import AgentConfig, IdleConfig, TelemetryConfig
from rawvm_agent.server import create_app, server_ssl_context
from rawvm_agent.telemetry import CONTENT_TYPE

from tests.agent.core_helpers import TOKEN, free_port
from tests.agent.test_nvml import prom_value
from tests.agent.test_nvml_fakelib import eight_gpus, installed
from tests.helpers.processes import stop
from tests.systools import need_tool

AUTH = {"Authorization": f"Bearer {TOKEN}"}
SCRAPE_WAIT_S = 120  # bound on how long Prometheus may take to start and scrape; not a speed assertion

ServerFactory = Callable[..., Awaitable[TestServer]]


def agent_config(state_dir: Path) -> AgentConfig:
    return AgentConfig(
        token=TOKEN,
        state_dir=str(state_dir),
        idle=IdleConfig(keepalive=3600.0, poweroff_command=()),
        telemetry=TelemetryConfig(interval=0.2),
    )


async def serve_agent(aiohttp_server: ServerFactory, state_dir: Path, tls: dict[str, str] | None = None) -> TestServer:
    """A real Agent behind a test server; with ``tls`` (agent.toml's ``tls_*`` paths) over its mutual TLS."""
    config = agent_config(state_dir)
    agent = Agent(dataclasses.replace(config, **tls) if tls else config)
    context = server_ssl_context(agent.config) if tls else None
    server = await aiohttp_server(create_app(agent), host="127.0.0.1", port=free_port(), ssl=context)
    deadline = time.monotonic() + 30
    while agent.sampler.latest() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert agent.sampler.latest() is not None, "the agent took no telemetry sample"
    return server


async def get_metrics(server: TestServer) -> str:
    async with ClientSession() as http, http.get(server.make_url("/metrics"), headers=AUTH) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == CONTENT_TYPE
        return await resp.text()


def promtool_check(text: str) -> None:
    promtool = need_tool("promtool", "prometheus")
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"promtool: {result.stdout}{result.stderr}"


async def test_agent_metrics_pass_promtool(aiohttp_server: ServerFactory, tmp_path: Path) -> None:
    server = await serve_agent(aiohttp_server, tmp_path)
    text = await get_metrics(server)
    promtool_check(text)
    assert prom_value(text, "rawvm_cpu_cores") == psutil.cpu_count()
    assert prom_value(text, "rawvm_memory_total_bytes") == psutil.virtual_memory().total
    assert prom_value(text, "rawvm_gpu_devices") == 0
    assert prom_value(text, "rawvm_telemetry_collector_success", collector="cpu") == 1
    assert "rawvm_agent_phase" in text  # the agent's own families come along in the same page


async def test_metrics_need_the_token(aiohttp_server: ServerFactory, tmp_path: Path) -> None:
    server = await serve_agent(aiohttp_server, tmp_path)
    async with ClientSession() as http:
        async with http.get(server.make_url("/metrics")) as resp:
            assert resp.status == 401
        async with http.get(server.make_url("/metrics"), headers={"Authorization": "Bearer wrong"}) as resp:
            assert resp.status == 401


@pytest.fixture
def fake_gpus() -> Iterator[Any]:
    with installed(eight_gpus()) as lib:
        yield lib


async def test_agent_metrics_with_eight_gpus_pass_promtool(
    aiohttp_server: ServerFactory, tmp_path: Path, fake_gpus: Any
) -> None:
    server = await serve_agent(aiohttp_server, tmp_path)
    text = await get_metrics(server)
    promtool_check(text)
    assert prom_value(text, "rawvm_gpu_devices") == 8
    for i, gpu in enumerate(fake_gpus.gpus):
        labels = {"gpu": str(i), "uuid": gpu.uuid}
        assert prom_value(text, "rawvm_gpu_memory_used_bytes", **labels) == gpu.memory_used
        assert prom_value(text, "rawvm_gpu_power_watts", **labels) == (None if i == 3 else gpu.power_mw / 1000)
    json_headers = {**AUTH, "Accept": "application/json"}
    async with ClientSession() as http, http.get(server.make_url("/v1/samples"), headers=json_headers) as resp:
        rows = await resp.json()
    assert rows and [g["uuid"] for g in rows[-1]["gpu"]] == [g.uuid for g in fake_gpus.gpus]
    assert "power_watts" not in rows[-1]["gpu"][3] and rows[-1]["gpu"][4]["power_watts"] == 106.0


# -- a real Prometheus server --------------------------------------------------------------------------------


def prometheus_config(agent_port: int) -> str:
    return f"""
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: rawvm-agent
    authorization:
      type: Bearer
      credentials: "{TOKEN}"
    static_configs:
      - targets: ["127.0.0.1:{agent_port}"]
  - job_name: wrong-token
    authorization:
      type: Bearer
      credentials: "not-the-token"
    static_configs:
      - targets: ["127.0.0.1:{agent_port}"]
"""


@pytest.fixture
async def prometheus_server(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """Start ``prometheus`` on a free loopback port scraping the given agent port (with ``prometheus_config``, or
    the ``config`` text given); stopped at teardown."""
    prometheus = need_tool("prometheus", "prometheus")
    procs: list[subprocess.Popen[bytes]] = []

    async def start(agent_port: int, config_text: str | None = None) -> str:
        config = tmp_path / "prometheus.yml"
        config.write_text(config_text or prometheus_config(agent_port))
        port = free_port()
        log = (tmp_path / "prometheus.log").open("wb")
        procs.append(
            subprocess.Popen(
                [
                    prometheus,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        return f"http://127.0.0.1:{port}"

    yield start
    for proc in procs:
        stop(proc, timeout=30)


async def targets_by_job(http: ClientSession, base: str) -> dict[str, dict[str, Any]]:
    try:
        async with http.get(f"{base}/api/v1/targets") as resp:
            if resp.status != 200:
                return {}
            body = await resp.json()
    except OSError:
        return {}  # not listening yet
    return {t["labels"]["job"]: t for t in body["data"]["activeTargets"]}


@pytest.mark.slow
async def test_real_prometheus_scrapes_the_agent(
    aiohttp_server: ServerFactory,
    prometheus_server: Callable[[int], Awaitable[str]],
    tmp_path: Path,
) -> None:
    server = await serve_agent(aiohttp_server, tmp_path / "state")
    assert server.port is not None
    base = await prometheus_server(server.port)
    targets: dict[str, dict[str, Any]] = {}
    async with ClientSession() as http:
        deadline = time.monotonic() + SCRAPE_WAIT_S
        while time.monotonic() < deadline:
            targets = await targets_by_job(http, base)
            good, bad = targets.get("rawvm-agent", {}), targets.get("wrong-token", {})
            if good.get("health") == "up" and bad.get("health") == "down":
                break
            await asyncio.sleep(0.5)
        log = (tmp_path / "prometheus.log").read_text(errors="replace")[-3000:]
        assert targets.get("rawvm-agent", {}).get("health") == "up", f"{targets}\n{log}"
        assert targets["rawvm-agent"]["lastError"] == ""
        assert "401" in targets["wrong-token"]["lastError"]
        # The scraped values are in Prometheus's database, not only "up".
        async with http.get(f"{base}/api/v1/query", params={"query": 'rawvm_cpu_cores{job="rawvm-agent"}'}) as resp:
            result = (await resp.json())["data"]["result"]
    assert [float(r["value"][1]) for r in result] == [psutil.cpu_count()]
