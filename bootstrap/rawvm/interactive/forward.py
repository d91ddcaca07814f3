"""``rawvm forward CLUSTER [MACHINE] LOCAL:REMOTE``: a port on the machine's loopback, reachable on the laptop's.

The laptop listens on ``127.0.0.1:LOCAL``; each connection accepted there becomes one websocket to the agent
(``GET /v1/forward?port=REMOTE``), which connects to ``127.0.0.1:REMOTE`` on the machine and pipes bytes both
ways. Only the machine's loopback is reachable this way, and nothing new is opened in any security group: a
TensorBoard or a Dask dashboard bound to 127.0.0.1 stays private to whoever holds the cluster's credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable

from rawvm_agent.wsframes import SessionClosed, pipe

from rawvm.agent.client import AgentClient, AgentError
from rawvm.errors import UsageError
from rawvm.interactive.target import machine_client

_PORTS = re.compile(r"([0-9]{1,5}):([0-9]{1,5})")


def parse_ports(raw: str) -> tuple[int, int]:
    """``LOCAL:REMOTE`` as two port numbers (LOCAL 0: any free port); a UsageError otherwise."""
    match = _PORTS.fullmatch(raw)
    local, remote = (int(match[1]), int(match[2])) if match else (-1, -1)
    if not (0 <= local <= 65535 and 1 <= remote <= 65535):
        raise UsageError(f"{raw!r}: write the ports as LOCAL:REMOTE, e.g. 6006:6006")
    return local, remote


def _handler(
    client: AgentClient, remote: int, say: Callable[[str], None]
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with client.websocket("/v1/forward", params={"port": str(remote)}) as ws:
                await pipe(ws, reader, writer)
        except AgentError as exc:
            hint = " (is anything listening on the machine's 127.0.0.1?)" if exc.status == 502 else ""
            say(f"forward to port {remote}: {exc}{hint}")
        except (SessionClosed, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    return handle


async def listen(client: AgentClient, local: int, remote: int, say: Callable[[str], None]) -> asyncio.Server:
    """A server on ``127.0.0.1:local`` (0: any free port) tunnelling each connection to ``remote`` on the machine's
    loopback (``rawvm notebook`` serves Jupyter with it); a UsageError when the port is taken."""
    try:
        return await asyncio.start_server(_handler(client, remote, say), "127.0.0.1", local)
    except OSError as exc:
        raise UsageError(f"cannot listen on 127.0.0.1:{local}: {exc.strerror or exc}") from None


async def forward(
    cluster: str, machine: str, ports: str, say: Callable[[str], None], ready: Callable[[int], None] | None = None
) -> None:
    """Serve the forward until cancelled (Ctrl-C); ``ready`` gets the local port once it listens."""
    local, remote = parse_ports(ports)
    async with machine_client(cluster, machine) as (mid, client):
        server = await listen(client, local, remote, say)
        async with server:
            port = int(server.sockets[0].getsockname()[1])
            say(f"forwarding 127.0.0.1:{port} to port {remote} on {mid}'s loopback; Ctrl-C ends it")
            if ready is not None:
                ready(port)
            await server.serve_forever()
