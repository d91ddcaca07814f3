"""A batch's results as this host sees them: from the sink (flushed by machines as they stop) and from live
agents, merged so the latest attempt of each id wins."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rawvm_agent.batch_results import read_results

from rawvm import sinks


def newest(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    """Of two results for one id, the later one (a retry round's result replaces a failed one)."""
    if a is None or float(b.get("ended_at") or 0) >= float(a.get("ended_at") or 0):
        return b
    return a


def sink_results(cluster: str) -> dict[int, dict[str, Any]]:
    """Every result the cluster's machines flushed to the sink (on this host, after ``fetch_flushes``)."""
    found: dict[int, dict[str, Any]] = {}
    for flush in sinks.sink_dir(cluster).glob(f"{cluster}-*/batch/results"):
        for result in read_results(flush):
            found[result["id"]] = newest(found.get(result["id"]), result)
    return found


def sink_task_dir(cluster: str, agent_task: str) -> Path | None:
    """The newest flushed copy of an agent task's directory (stdout, stderr, task.json)."""
    found = sorted(sinks.sink_dir(cluster).glob(f"{cluster}-*/tasks/{agent_task}"))
    return found[-1] if found else None


@dataclass
class BatchStatus:
    cluster: str
    states: dict[int, str]  # id -> done | failed | running | queued | lost
    results: dict[int, dict[str, Any]]
    running: dict[int, tuple[str, str]]  # id -> (machine, agent task id)
    answering: list[str]  # machines whose agents answered

    def ids(self, state: str) -> list[int]:
        return sorted(i for i, s in self.states.items() if s == state)

    def counts(self) -> dict[str, int]:
        return {s: len(self.ids(s)) for s in ("done", "failed", "running", "queued", "lost")}
