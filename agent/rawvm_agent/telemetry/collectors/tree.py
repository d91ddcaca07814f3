"""CPU and memory of one process tree (the agent and everything it started), for machines that share a host.

A ``local`` machine is an agent process on the caller's host: the host's CPU and memory are everyone's, so every
local machine would report the same figures (``telemetry.scope = "process-tree"`` picks these collectors). The
tree is the agent process and its descendants (tasks, their children, a Dask nanny's worker); processes that
re-parent away from it (double-forked daemons) are not counted. The figures keep the machine collectors' shape and
meaning: ``percent`` is the busy share of all the host's cores, ``used_bytes`` the tree's resident memory (the
host's total and available stay the host's, as a container's would).
"""

from __future__ import annotations

import os
import time
from typing import Any

import psutil

from rawvm_agent.telemetry.collectors.cpu import CpuCollector
from rawvm_agent.telemetry.collectors.memory import MemoryCollector

SCOPE = "process-tree"

_Key = tuple[int, float]  # (pid, create time): pids recycle


def tree_processes(root: psutil.Process) -> list[psutil.Process]:
    """``root`` and its live descendants ([] once the root itself is gone)."""
    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


class TreeCpuCollector(CpuCollector):
    """Busy CPU seconds of the tree over the last interval, as a share of all the host's cores."""

    def __init__(self, root_pid: int = 0) -> None:  # no super().__init__: the host-wide baseline is not used
        self._root = psutil.Process(root_pid or os.getpid())
        self._cores = psutil.cpu_count() or 1
        self._ended = {"user": 0.0, "system": 0.0}  # seconds of the processes that have ended since the start
        self._times = self._read()
        self._at = time.monotonic()

    def _read(self) -> dict[_Key, tuple[float, float]]:
        found = {}
        for proc in tree_processes(self._root):
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    found[(proc.pid, proc.create_time())] = (times.user, times.system)
            except psutil.Error:
                continue
        return found

    def collect(self) -> dict[str, Any]:
        now, at = self._read(), time.monotonic()
        before, elapsed = self._times, at - self._at
        # A process new since the last tick counts from zero: all of its CPU time falls in this interval.
        busy = sum(max(0.0, u + s - sum(before.get(key, (0.0, 0.0)))) for key, (u, s) in now.items())
        for key in before.keys() - now.keys():  # ended: its last partial interval is lost, its total kept
            self._ended["user"] += before[key][0]
            self._ended["system"] += before[key][1]
        self._times, self._at = now, at
        percent = 100.0 * busy / (elapsed * self._cores) if elapsed > 0 else 0.0
        return {
            "percent": round(min(100.0, max(0.0, percent)), 2),
            "per_core_percent": [],  # a process tree has no cores of its own
            "seconds": {
                "user": round(self._ended["user"] + sum(u for u, _ in now.values()), 2),
                "system": round(self._ended["system"] + sum(s for _, s in now.values()), 2),
            },
            "cores": self._cores,
            "scope": SCOPE,
        }


class TreeMemoryCollector(MemoryCollector):
    """The tree's resident memory as ``used_bytes``; the host's total, available and swap as they are."""

    def __init__(self, root_pid: int = 0) -> None:
        self._root = psutil.Process(root_pid or os.getpid())

    def collect(self) -> dict[str, int]:
        out = super().collect()
        used = 0
        for proc in tree_processes(self._root):
            try:
                used += int(proc.memory_info().rss)
            except psutil.Error:
                continue
        out["used_bytes"] = used
        return out
