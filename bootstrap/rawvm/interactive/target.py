"""Which machine a person means: ``CLUSTER`` and an optional ``MACHINE`` (``m0``, the first one, by default)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from rawvm import clusters
from rawvm.agent.client import AgentClient
from rawvm.errors import UsageError
from rawvm.providers.base import Machine


def pick_machine(record: clusters.ClusterRecord, machine: str = "") -> Machine:
    """The machine named ``machine`` (short id ``m0`` or full id) of ``record``; its first one when unnamed."""
    if not record.machines:
        raise UsageError(f"cluster {record.name} has no machines")
    if not machine:
        return record.machines[0]
    for candidate in record.machines:
        if machine in (candidate.short_id, candidate.id):
            return candidate
    names = ", ".join(m.short_id for m in record.machines)
    raise UsageError(f"cluster {record.name} has no machine {machine!r}: it has {names}")


@contextlib.asynccontextmanager
async def machine_client(cluster: str, machine: str = "") -> AsyncIterator[tuple[str, AgentClient]]:
    """(the machine's short id, a client of its agent) for the length of the block."""
    record = clusters.load(clusters.check_name(cluster))
    chosen = pick_machine(record, machine)
    async with AgentClient.for_cluster(record, chosen.agent_url, connect_timeout=10.0) as client:
        yield chosen.short_id, client
