"""Load averages over 1, 5 and 15 minutes."""

from __future__ import annotations

from collections.abc import Iterator

import psutil

from rawvm_agent.telemetry.prometheus import gauge


class LoadCollector:
    name = "load"

    def collect(self) -> dict[str, float]:
        one, five, fifteen = psutil.getloadavg()
        return {"load1": round(one, 2), "load5": round(five, 2), "load15": round(fifteen, 2)}

    def metrics(self, value: dict[str, float]) -> Iterator[str]:
        for key, load in value.items():
            yield gauge(f"rawvm_{key}", f"{key.removeprefix('load')}-minute load average.", load)

    def close(self) -> None:
        pass
