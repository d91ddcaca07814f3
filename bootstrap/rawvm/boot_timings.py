"""Where a start-up went: each machine's boot phases, asked of its agent, kept in the cluster record and shown.

The agent records its machine's way to the first task (rawvm_agent/boot_phases.py: kernel boot, bootstrap script,
the agent's venv, the agent, the bundle, uv, the environment, the first task). After a run the laptop asks each
agent once, stores the phases on the machine's record (so ``rawvm ls --json`` and ``rawvm report`` show them without
asking again) and, with ``rawvm run --timings``, prints one line a machine: each phase as seconds since the launch
request, with the step from the phase before.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping

from rawvm_agent.boot_phases import ORDER

from rawvm import clusters
from rawvm.agent.client import AgentClient, AgentError
from rawvm.providers.base import Machine

__all__ = ["PHASE_ORDER", "fetch", "phase_line", "remember"]

PHASE_ORDER = ORDER  # the agent's own list: one definition of the way to the first task


async def fetch(agents: Mapping[str, AgentClient]) -> dict[str, dict[str, float]]:
    """Each answering machine's boot phases (short id to phase to unix time); a silent one is left out."""

    async def one(client: AgentClient) -> dict[str, float]:
        try:
            status = await client.status()
        except AgentError:
            return {}
        raw = status.get("boot_phases")
        if not isinstance(raw, dict):
            return {}
        return {
            str(name): float(at)
            for name, at in raw.items()
            if name in PHASE_ORDER and isinstance(at, int | float) and math.isfinite(at)
        }

    answers = await asyncio.gather(*(one(client) for client in agents.values()))
    return {mid: phases for mid, phases in zip(agents, answers, strict=True) if phases}


def remember(record: clusters.ClusterRecord, phases: Mapping[str, Mapping[str, float]]) -> None:
    """Keep the phases on the machines' records (saved), so later commands need not ask the agents."""
    changed = False
    for machine in record.machines:
        found = phases.get(machine.short_id)
        if found and dict(found) != machine.boot_phases:
            machine.boot_phases = dict(found)
            changed = True
    if changed and clusters.exists(record.name):
        clusters.save(record)


def phase_line(machine: Machine) -> str:
    """``m0 start-up: launched 0.0 s → agent_up 0.8 s (+0.8) → … → first_task_started 3.6 s (+0.1)``."""
    start = machine.launched_at or min(machine.boot_phases.values(), default=0.0)
    parts = ["launched 0.0 s"]
    previous = start
    for name in PHASE_ORDER:
        at = machine.boot_phases.get(name)
        if at is None:
            continue
        parts.append(f"{name} {at - start:.1f} s (+{at - previous:.1f})")
        previous = at
    return f"{machine.short_id} start-up: " + " → ".join(parts)
