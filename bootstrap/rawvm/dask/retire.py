"""Retiring one worker machine of a ``rawvm.dask_cluster`` when ``scale(n)`` goes down.

``SpecCluster`` retires the workers it drops by asking the scheduler for ``retire_workers(workers=<spec names>)``,
but the scheduler reads ``workers=`` as addresses, so nothing is retired and the ``ProcessInterface.close()`` of
the dropped spec is all that happens (Dask's own ``Nanny`` and dask-cloudprovider's ``VMInterface`` stop the
process or VM there). So a rawvm worker's ``close()`` does the retiring itself: it asks the scheduler to retire
its workers *by name* (their data moves to the workers that stay, then they close), and tells the machine's agent
to stop (it flushes its logs and telemetry, then powers off). If the laptop goes away in between, the machine still
powers itself off: with no Dask process left it has no task, and its agent idles off after the grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from rawvm.agent.client import AgentClient, AgentError

RETIRE_TIMEOUT_S = 45.0  # moving a worker's data can take a while; scale() down promises "within a minute"
_STOP_TIMEOUT_S = 10.0

log = logging.getLogger(__name__)


async def retire_machine(
    scheduler_address: str,
    connection_args: dict[str, Any],
    names: Sequence[str],
    client: AgentClient | None,
) -> None:
    """Retire the Dask workers ``names`` (one machine's) through the scheduler, then stop the machine through
    ``client`` (None: the machine also runs the scheduler, and stays). Never raises: a scheduler or agent that
    is already gone is what retiring wanted anyway."""
    from distributed.core import rpc

    if names and scheduler_address:
        scheduler = rpc(scheduler_address, connection_args=connection_args, timeout=10)
        try:
            await asyncio.wait_for(
                scheduler.retire_workers(names=list(names), close_workers=True, remove=True), RETIRE_TIMEOUT_S
            )
        except (OSError, TimeoutError, ValueError) as exc:
            log.info("rawvm: retiring Dask workers %s: %s", ", ".join(names), exc)
        finally:
            with contextlib.suppress(OSError, ValueError):
                await scheduler.close_rpc()
    if client is not None:
        try:
            await asyncio.wait_for(client.shutdown(), _STOP_TIMEOUT_S)
        except (AgentError, TimeoutError) as exc:  # the agent idles off by itself after the grace
            log.info("rawvm: stopping a retired Dask worker's machine: %s", exc)
