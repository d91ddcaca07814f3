"""The routes a person uses, each a websocket on the agent's mutual-TLS API (no SSH, no extra port):

- ``GET /v1/shell``: a command or a login shell on a pseudo-terminal (shell.py);
- ``GET /v1/files``: ``rawvm cp`` both ways, streamed and sha256-checked (filestream.py);
- ``GET /v1/forward?port=N``: one TCP connection to ``127.0.0.1:N`` on this machine, piped both ways.

Every open session holds a place in the agent's Presence, so the machine does not idle off under a person; the
websocket's heartbeat ends the session of a laptop that vanished, and with it that hold.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from aiohttp import web

from rawvm_agent import shell
from rawvm_agent.app import AGENT_KEY, Agent
from rawvm_agent.filestream import TransferError, receive_and_answer, send_and_check
from rawvm_agent.query import int_param
from rawvm_agent.wsframes import HEARTBEAT_S, MAX_MESSAGE_BYTES, SessionClosed, pipe, receive, send_json

routes = web.RouteTableDef()
FIRST_MESSAGE_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0


def add_routes(app: web.Application) -> None:
    app.add_routes(routes)


def _agent(request: web.Request) -> Agent:
    agent = request.app[AGENT_KEY]
    if agent.stopping:
        raise web.HTTPConflict(text='{"error": "the machine is stopping"}', content_type="application/json")
    return agent


def _where(agent: Agent) -> tuple[dict[str, str], Path]:
    """The environment and directory a person lands in: the task environment and the work dir once installed;
    before that (or when the install failed: worth a look) the agent's own environment and state dir."""
    if agent.env is not None:
        return agent.env.task_environ(agent.environ), agent.env.work_dir
    return dict(agent.environ), agent.state_dir


async def _open(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S, max_msg_size=MAX_MESSAGE_BYTES)
    await ws.prepare(request)
    return ws


@routes.get("/v1/shell")
async def shell_session(request: web.Request) -> web.WebSocketResponse:
    agent = _agent(request)
    ws = await _open(request)
    with agent.people.hold("shell"):
        try:
            parsed = shell.ShellRequest.from_json(await receive(ws, FIRST_MESSAGE_TIMEOUT_S))
        except shell.ShellError as exc:
            await send_json(ws, {"error": str(exc)})
        except (SessionClosed, TimeoutError):
            pass
        else:
            environ, cwd = _where(agent)
            await shell.serve(ws, parsed, environ, cwd)
        await ws.close()
    return ws


def machine_path(agent: Agent, raw: str) -> Path:
    """A path named by the laptop: as is when absolute, else under the work dir (where tasks run)."""
    path = Path(raw).expanduser()
    return path if path.is_absolute() else _where(agent)[1] / path


@routes.get("/v1/files")
async def files_session(request: web.Request) -> web.WebSocketResponse:
    """First message ``{"op": "put"|"get", "path": P}``; then filestream's messages, this side receiving (put)
    or sending (get)."""
    agent = _agent(request)
    ws = await _open(request)
    with agent.people.hold("files"):
        try:
            first = await receive(ws, FIRST_MESSAGE_TIMEOUT_S)
            if not isinstance(first, dict) or first.get("op") not in ("put", "get") or not first.get("path"):
                raise TransferError('the first message must be {"op": "put"|"get", "path": PATH}')
            raw = str(first["path"])
            if first["op"] == "put":
                await receive_and_answer(ws, machine_path(agent, raw), into_dir=raw.endswith("/"))
            else:
                await send_and_check(ws, machine_path(agent, raw), contents=raw.endswith("/"))
        except TransferError as exc:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await send_json(ws, {"error": str(exc)})
        except (SessionClosed, TimeoutError):
            pass
        await ws.close()
    return ws


@routes.get("/v1/forward")
async def forward_session(request: web.Request) -> web.StreamResponse:
    """Connect to ``127.0.0.1:port`` first (a 502 before any upgrade when nothing listens), then pipe."""
    agent = _agent(request)
    port = int_param(request, "port", 0, minimum=1, maximum=65535)
    if not port:
        return web.json_response({"error": "'port' (1 to 65535) is required"}, status=400)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        words = getattr(exc, "strerror", None) or "timed out"
        return web.json_response({"error": f"cannot connect to 127.0.0.1:{port} on this machine: {words}"}, status=502)
    with agent.people.hold("forward"):
        ws = await _open(request)
        try:
            await pipe(ws, reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            await ws.close()
    return ws
