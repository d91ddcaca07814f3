"""CPU: seconds per mode (all cores) and busy percent, total and per core, since the previous tick."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psutil

from rawvm_agent.telemetry.prometheus import family

# Linux counts guest time inside user/nice already; psutil reports it separately, so it is left out of totals.
_NOT_IN_TOTAL = frozenset({"guest", "guest_nice"})
_IDLE = frozenset({"idle", "iowait"})


def _busy_and_total(times: Any) -> tuple[float, float]:
    total = busy = 0.0
    for mode, seconds in zip(times._fields, times, strict=True):
        if mode in _NOT_IN_TOTAL:
            continue
        total += seconds
        if mode not in _IDLE:
            busy += seconds
    return busy, total


def _percent(now: tuple[float, float], before: tuple[float, float]) -> float:
    busy, total = now[0] - before[0], now[1] - before[1]
    if total <= 0:
        return 0.0
    return round(min(100.0, max(0.0, 100.0 * busy / total)), 2)


class CpuCollector:
    name = "cpu"

    def __init__(self) -> None:
        # The baseline makes the first tick a real interval instead of an average since boot.
        self._before = [_busy_and_total(t) for t in psutil.cpu_times(percpu=True)]

    def collect(self) -> dict[str, Any]:
        per_core = psutil.cpu_times(percpu=True)
        now = [_busy_and_total(t) for t in per_core]
        before = self._before if len(self._before) == len(now) else now  # a CPU came online: restart deltas
        self._before = now
        core_percent = [_percent(n, b) for n, b in zip(now, before, strict=True)]
        total_now = (sum(n[0] for n in now), sum(n[1] for n in now))
        total_before = (sum(b[0] for b in before), sum(b[1] for b in before))
        seconds: dict[str, float] = {}
        for times in per_core:
            for mode, value in zip(times._fields, times, strict=True):
                seconds[mode] = seconds.get(mode, 0.0) + value
        return {
            "percent": _percent(total_now, total_before),
            "per_core_percent": core_percent,
            "seconds": {mode: round(value, 2) for mode, value in seconds.items()},
            "cores": len(per_core),
        }

    def metrics(self, value: dict[str, Any]) -> Iterator[str]:
        yield family(
            "rawvm_cpu_seconds_total",
            "counter",
            "Seconds all CPUs spent in each mode since boot.",
            [({"mode": mode}, seconds) for mode, seconds in value["seconds"].items()],
        )
        yield family(
            "rawvm_cpu_utilization_ratio",
            "gauge",
            "Busy share of all CPUs over the last sample interval (0-1).",
            [({}, value["percent"] / 100.0)],
        )
        yield family(
            "rawvm_cpu_core_utilization_ratio",
            "gauge",
            "Busy share of each CPU core over the last sample interval (0-1).",
            [({"cpu": str(i)}, p / 100.0) for i, p in enumerate(value["per_core_percent"])],
        )
        yield family("rawvm_cpu_cores", "gauge", "Number of logical CPUs.", [({}, value["cores"])])

    def close(self) -> None:
        pass
