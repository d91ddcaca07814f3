"""``telemetry.scope = "process-tree"`` (local machines): CPU and memory of the agent's own process tree, with real
processes: a busy grandchild counts, a busy process outside the tree does not; memory a child holds counts."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from rawvm_agent.config import TelemetryConfig
from rawvm_agent.telemetry.collectors import CpuCollector, MemoryCollector, TreeCpuCollector, TreeMemoryCollector
from rawvm_agent.telemetry.sampler import Sampler

BUSY = "import time\nend = time.time() + 60\nwhile time.time() < end:\n    pass\n"
HOLD = "import time\nblock = bytearray(300 << 20)\nblock[::4096] = b'x' * len(block[::4096])\ntime.sleep(60)\n"
# A root that starts the given code as its child and waits: the code runs as the tree's grandchild's level.
PARENT = "import subprocess, sys\nsubprocess.run([sys.executable, '-c', sys.argv[1]])\n"


@pytest.fixture
def spawn() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        for child in psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []:
            child.kill()
        proc.kill()
        proc.wait()


def start(started: list[subprocess.Popen[bytes]], code: str) -> psutil.Process:
    proc = subprocess.Popen([sys.executable, "-c", PARENT, code])
    started.append(proc)
    root = psutil.Process(proc.pid)
    deadline = time.monotonic() + 10
    while not root.children() and time.monotonic() < deadline:
        time.sleep(0.05)
    return root


def test_a_busy_grandchild_counts_and_a_busy_stranger_does_not(spawn: list[subprocess.Popen[bytes]]) -> None:
    cores = psutil.cpu_count() or 1
    busy_tree = start(spawn, BUSY)
    idle_tree = start(spawn, "import time; time.sleep(60)")
    start(spawn, BUSY)  # a stranger's load on the same host
    busy, idle = TreeCpuCollector(busy_tree.pid), TreeCpuCollector(idle_tree.pid)
    time.sleep(1.5)
    busy_value, idle_value = busy.collect(), idle.collect()
    one_core = 100.0 / cores
    # up to one core's worth (much less on a host shared with other work, as CI's and this one's are)
    assert 2.0 <= busy_value["percent"] <= one_core * 1.2 + 1, busy_value
    assert idle_value["percent"] < 1.0, idle_value
    assert busy_value["scope"] == "process-tree" and busy_value["cores"] == cores
    assert busy_value["seconds"]["user"] > idle_value["seconds"]["user"]
    assert "".join(CpuCollector.metrics(busy, busy_value)).count("rawvm_cpu_utilization_ratio") >= 1


def test_memory_a_child_holds_counts_and_the_hosts_total_stays(spawn: list[subprocess.Popen[bytes]]) -> None:
    holder = start(spawn, HOLD)
    idle = start(spawn, "import time; time.sleep(60)")
    deadline = time.monotonic() + 20
    while TreeMemoryCollector(holder.pid).collect()["used_bytes"] < 300 << 20 and time.monotonic() < deadline:
        time.sleep(0.2)
    held, quiet = TreeMemoryCollector(holder.pid).collect(), TreeMemoryCollector(idle.pid).collect()
    host = MemoryCollector().collect()
    assert held["used_bytes"] >= 300 << 20 > quiet["used_bytes"]
    assert held["total_bytes"] == host["total_bytes"]


def test_the_sampler_takes_the_scope_from_the_config(tmp_path: Path) -> None:
    tree = Sampler(TelemetryConfig(scope="process-tree"), tmp_path / "a")
    machine = Sampler(TelemetryConfig(), tmp_path / "b")
    try:
        assert tree.sample_once()["cpu"]["scope"] == "process-tree"
        assert "scope" not in machine.sample_once()["cpu"]
    finally:
        tree.close()
        machine.close()
    with pytest.raises(ValueError, match=r"telemetry\.scope"):
        Sampler(TelemetryConfig(scope="host"), tmp_path / "c")
