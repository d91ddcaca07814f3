"""``rawvm top``: three real local machines (agent processes), a CPU burner on one, the CLI run as a user runs it.

``--json`` must show the burner's machine busy with its task and the others idle with a running idle clock; a
machine whose agent is frozen (SIGSTOP: it accepts connections and never answers) shows as not answering while
the others still report. A tmux session runs the live view in a real terminal and ``capture-pane`` reads it.
GPU columns come from the real agent app in-process with 8 GPUs (NVML's C library faked, ``pynvml.nvmlLib``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from rawvm import clusters
from rawvm.agent.client import AgentClient
from rawvm.cli.top import render, snapshot_json
from rawvm.observe.top import Follower
from rawvm.providers.base import Machine
from rich.console import Console

from tests.agent.core_helpers import TOKEN
from tests.agent.test_metrics_prometheus import ServerFactory, serve_agent
from tests.agent.test_nvml_fakelib import FakeNvmlLib, eight_gpm_gpus, eight_gpus, installed
from tests.helpers.local import local_project
from tests.helpers.tls import Channel, make_test_channel
from tests.systools import need_tool

BURN = "import sys, time\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end:\n    pass\n"


def rawvm(*args: str, env: dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rawvm.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


class Cluster:
    def __init__(self, name: str, env: dict[str, str], project: Path) -> None:
        self.name, self.env, self.project = name, env, project

    def top_json(self) -> dict[str, Any]:
        result = rawvm("top", self.name, "--json", env=self.env, cwd=self.project)
        assert result.returncode == 0, result.stderr
        snapshot: list[dict[str, Any]] = json.loads(result.stdout)
        return {m["machine"]: m for m in snapshot}

    def record(self) -> clusters.ClusterRecord:
        os.environ["RAWVM_STATE_DIR"] = self.env["RAWVM_STATE_DIR"]
        try:
            return clusters.load(self.name)
        finally:
            del os.environ["RAWVM_STATE_DIR"]

    def agent_process(self, machine: str) -> psutil.Process:
        (m,) = [x for x in self.record().machines if x.id.endswith(f"-{machine}")]
        wrapper = psutil.Process(int(m.details["pid"]))
        (agent,) = [c for c in wrapper.children() if "rawvm_agent" in " ".join(c.cmdline())]
        return agent


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three local machines from an empty requirements file (nothing to fetch), a CPU burner on m0."""
    project, _, env = local_project(tmp_path_factory.mktemp("top"), {"requirements.txt": "", "burn.py": BURN})
    up = rawvm("up", "-n", "3", "--keepalive", "10m", "--from", "requirements.txt", env=env, cwd=project, timeout=300)
    assert up.returncode == 0, up.stderr
    found = Cluster(up.stdout.strip(), env, project)
    try:
        (m0,) = [m for m in found.record().machines if m.id.endswith("-m0")]

        async def burn() -> None:
            async with AgentClient.for_cluster(found.record(), m0.agent_url) as agent:
                await agent.submit(["python", "burn.py", "600"])

        asyncio.run(burn())
        yield found
    finally:
        rawvm("down", found.name, env=env, cwd=project)


def wait_for(check: Any, what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.mark.slow
def test_top_json_shows_the_busy_machine_busy_and_the_others_idle(cluster: Cluster) -> None:
    def burner_seen() -> dict[str, Any] | None:
        views = cluster.top_json()
        others_idle = all(views[m]["phase"] == "idle" for m in ("m1", "m2"))  # ready until the first idle look
        return views if views["m0"]["phase"] == "busy" and views["m0"]["cpu_percent"] and others_idle else None

    views = wait_for(burner_seen, "m0 busy and m1, m2 idle in rawvm top --json", timeout=120)
    assert sorted(views) == ["m0", "m1", "m2"]
    m0 = views["m0"]
    assert m0["answering"] and m0["task"] == "python burn.py 600" and m0["tasks_running"] == 1
    assert m0["idle_seconds"] == 0 and m0["cpu_percent"] > 0
    for other in ("m1", "m2"):
        v = views[other]
        assert v["answering"] and v["phase"] == "idle" and v["task"] == "" and v["tasks_running"] == 0
        assert v["idle_seconds"] > 0 and v["keepalive_s"] == 600
    plain = rawvm("top", cluster.name, env=cluster.env, cwd=cluster.project)  # piped: one plain table
    assert plain.returncode == 0, plain.stderr
    rows = {line.split()[0]: line for line in plain.stdout.splitlines() if line.split()[:1] in (["m0"], ["m1"], ["m2"])}
    assert " busy " in rows["m0"] and "python burn.py 600" in rows["m0"] and " idle " in rows["m1"]
    assert "\x1b[?1049h" not in plain.stdout  # no alternate screen when not on a terminal
    for v in views.values():
        # local machines share this host: its memory and disk, and a free price
        assert v["memory_total_bytes"] == psutil.virtual_memory().total
        assert v["disk_total_bytes"] > 0 and v["seq"] > 0
        assert v["cost_so_far_usd"] == 0.0 and v["provider"] == "local"


@pytest.mark.slow
def test_a_frozen_machine_shows_as_not_answering_and_the_others_still_report(cluster: Cluster) -> None:
    agent = cluster.agent_process("m1")
    before = cluster.top_json()
    agent.send_signal(signal.SIGSTOP)  # its socket still accepts; nothing answers
    try:

        def others_moved_on() -> dict[str, Any] | None:
            views = cluster.top_json()
            moved = all(views[m]["answering"] and views[m]["seq"] > before[m]["seq"] for m in ("m0", "m2"))
            return views if moved and not views["m1"]["answering"] else None

        # Under load a snapshot can come before the others' next 1 Hz sample; m1 stays frozen meanwhile.
        views = wait_for(others_moved_on, "m0 and m2 reporting new samples while m1 is frozen", timeout=60)
    finally:
        agent.send_signal(signal.SIGCONT)
    assert not views["m1"]["answering"] and views["m1"]["error"].startswith("no answer")
    wait_for(lambda: cluster.top_json()["m1"]["answering"], "m1 answering again after SIGCONT", timeout=30)


@pytest.mark.slow
def test_top_in_a_real_terminal(cluster: Cluster, tmp_path: Path) -> None:
    tmux = need_tool("tmux", "tmux")
    socket_name = f"rawvm-top-{os.getpid()}"
    command = f"{sys.executable} -m rawvm.cli top {cluster.name}; echo TOP-EXITED $?; sleep 30"
    base = [tmux, "-L", socket_name]
    env = {k: v for k, v in cluster.env.items() if k != "TMUX"}
    subprocess.run([*base, "new-session", "-d", "-x", "220", "-y", "20", command], env=env, check=True, timeout=30)
    try:

        def screen() -> str:
            result = subprocess.run([*base, "capture-pane", "-p"], capture_output=True, text=True, timeout=30)
            return result.stdout

        def rows(text: str) -> dict[str, str]:
            return {line.split()[0]: line for line in text.splitlines() if line.split()[:1] in (["m0"], ["m1"], ["m2"])}

        last = [""]

        def ready() -> str | None:
            # A whole frame: under load a capture can land mid-redraw (rows drawn, header and summary not yet)
            text = last[0] = screen()
            lines = rows(text)
            whole = "3 machines:" in text and "·" in text and len(lines) == 3 and "of 10m00s" in lines.get("m1", "")
            return text if whole and "python burn.py 600" in text and text.count(" idle ") >= 2 else None

        try:
            text = wait_for(ready, "rawvm top's table in the tmux pane")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the pane last showed:\n{last[0]}") from None
        lines = rows(text)
        assert sorted(lines) == ["m0", "m1", "m2"], text
        assert " busy " in lines["m0"] and "python burn.py 600" in lines["m0"]
        assert " idle " in lines["m1"] and " idle " in lines["m2"] and "of 10m00s" in lines["m1"]
        assert "3 machines: 1 busy, 2 idle, 0 not answering" in text and "free" in lines["m0"]
        first_clock = text.split("·")[4].strip()
        # refreshed every second: the clock in the header moves
        wait_for(lambda: screen().split("·")[4].strip() != first_clock, "the header clock to move", timeout=10)
        subprocess.run([*base, "send-keys", "C-c"], check=True, timeout=30)
        done = wait_for(lambda: "TOP-EXITED" in screen() and screen(), "rawvm top to leave on Ctrl-C", timeout=20)
        assert "TOP-EXITED 0" in done and "Traceback" not in done
    finally:
        subprocess.run([*base, "kill-server"], capture_output=True, timeout=30)


@pytest.fixture
def fake_gpus() -> Iterator[FakeNvmlLib]:
    with installed(eight_gpus()) as lib:
        yield lib


def record_for(url: str, provider: str, price: float, channel: Channel) -> clusters.ClusterRecord:
    machine = Machine(
        id="c1-m0", provider=provider, cluster="c1", agent_url=url, price_per_hour=price, launched_at=time.time() - 1800
    )
    laptop = str(channel.laptop.directory)
    return clusters.ClusterRecord(name="c1", provider=provider, token=TOKEN, machines=[machine], channel_dir=laptop)


async def test_gpu_columns_and_prices_from_an_agent_with_eight_gpus(
    aiohttp_server: ServerFactory, tmp_path: Path, fake_gpus: FakeNvmlLib
) -> None:
    channel = make_test_channel(tmp_path / "tls", "c1")
    server = await serve_agent(aiohttp_server, tmp_path, channel.agent)
    url = str(server.make_url("")).rstrip("/")
    async with Follower([record_for(url, "aws", 0.0, channel)]) as follower:
        (view,) = await follower.poll_all()
    assert view.answering and view.phase in ("ready", "idle", "busy")
    assert [g.index for g in view.gpus] == list(range(8))
    for g, f in zip(view.gpus, fake_gpus.gpus, strict=True):
        assert g.util_percent == f.util_gpu and g.memory_used_bytes == f.memory_used
        assert g.temperature_celsius == f.temperature_c
        assert g.power_watts == (None if f.power_mw is None else f.power_mw / 1000)
        assert g.throttle == (["sw_power_cap"] if f.clock_event_reasons == 0x4 else [])  # 0x1 (gpu_idle) is quiet
    assert view.price_per_hour is None and view.cost_so_far(time.time()) is None  # aws without a price: unknown
    assert json.loads(snapshot_json([view], time.time()))[0]["cost_so_far_usd"] is None

    console = Console(width=220, height=40, record=True, color_system=None)
    console.print(render([view], time.time(), 40))
    text = console.export_text()
    assert "unknown" in text and "sw_power_cap" in text and "75%" in text  # GPU 7: util 75
    assert "tensor" not in text  # no GPM on these GPUs: no tensor column at all
    assert sum(1 for line in text.splitlines() if " W " in line or line.rstrip().endswith(" W")) >= 7

    async with Follower([record_for(url, "aws", 4.0, channel)]) as follower:  # a known price: half an hour at $4/h
        (view,) = await follower.poll_all()
    assert view.cost_so_far(view.launched_at + 1800) == pytest.approx(2.0)
    # a screen too short for the 8 GPU lines leaves the machine out and says so
    console = Console(width=220, height=6, record=True, color_system=None)
    console.print(render([view], time.time(), 6))
    assert "1 more rows below the screen" in console.export_text()


async def test_tensor_activity_per_machine_from_gpm(aiohttp_server: ServerFactory, tmp_path: Path) -> None:
    with installed(eight_gpm_gpus()):
        channel = make_test_channel(tmp_path / "tls", "c1")
        server = await serve_agent(aiohttp_server, tmp_path, channel.agent)
        url = str(server.make_url("")).rstrip("/")
        async with Follower([record_for(url, "aws", 0.0, channel)]) as follower:
            deadline = time.monotonic() + 30
            (view,) = await follower.poll_all()
            while view.tensor_active_percent is None and time.monotonic() < deadline:  # GPM: two samples first
                await asyncio.sleep(0.1)
                (view,) = await follower.poll_all()
    # GPM's any-tensor utilization of GPU i is 30 + 2i %: per GPU, and the machine's mean 37 %
    assert [g.tensor_active_percent for g in view.gpus] == [30.0 + 2 * i for i in range(8)]
    assert view.tensor_active_percent == pytest.approx(37.0)
    console = Console(width=240, height=40, record=True, color_system=None)
    console.print(render([view], time.time(), 40))
    header, first = console.export_text().splitlines()[1:3]
    assert header.split()[-1] == "tensor" and first.split()[-1] == "37%"  # the last, optional column
