"""Processes: how many exist, how many run right now, how many threads (scheduling entities) exist."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psutil

from rawvm_agent.telemetry.prometheus import gauge

LOADAVG = Path("/proc/loadavg")  # a module constant, so a test can point it at a missing file


class ProcessesCollector:
    name = "processes"

    def collect(self) -> dict[str, int]:
        out = {"count": len(psutil.pids())}
        # /proc/loadavg's fourth field is "running/total" scheduling entities: one read, no per-pid scan.
        fields = LOADAVG.read_text().split()
        running, threads = fields[3].split("/")
        out["running"] = int(running)
        out["threads"] = int(threads)
        return out

    def metrics(self, value: dict[str, int]) -> Iterator[str]:
        yield gauge("rawvm_processes", "Number of processes.", value["count"])
        yield gauge("rawvm_processes_running", "Threads currently runnable or running.", value["running"])
        yield gauge("rawvm_threads", "Number of threads (kernel scheduling entities).", value["threads"])

    def close(self) -> None:
        pass
