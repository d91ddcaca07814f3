"""``GET /v1/sync``: the machine's half of ``rawvm notebook``'s two-way sync, one websocket per attached laptop.

The laptop moves file contents with ``GET /v1/files`` (filestream, sha256-checked) and uses this session to see
the machine's side and to delete what it deleted:

    laptop: {"owns": TASK_ID}          first message; "" when no task
    laptop: {"list": true}             agent: {"files": {REL: [SIZE, MTIME_NS, SHA256], ...}}
    laptop: {"delete": REL}            agent: {"deleted": REL}  or  {"error": MESSAGE}

The tree is the work dir (where tasks run and Jupyter saves), listed as ``synctree`` lists it on the laptop. While
the session is open it holds a place in the agent's Presence (a person is attached: the machine does not idle off),
and when it closes, however it closes (Ctrl-C on the laptop, or a laptop that vanished and stopped answering the
heartbeat), the task it owns (the notebook server) is cancelled, so nothing keeps the machine busy after the
person has gone and it idles off after its keepalive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from aiohttp import web

from rawvm_agent import synctree
from rawvm_agent.app import AGENT_KEY, Agent
from rawvm_agent.interactive_api import machine_path
from rawvm_agent.tasks import TaskState
from rawvm_agent.wsframes import HEARTBEAT_S, MAX_MESSAGE_BYTES, SessionClosed, receive, send_json

log = logging.getLogger("rawvm_agent.sync_api")
routes = web.RouteTableDef()
FIRST_MESSAGE_TIMEOUT_S = 30.0
RELEASE_GRACE_S = 10.0  # SIGTERM to SIGKILL: JupyterLab shuts its kernels (own process groups) down on SIGTERM


def add_routes(app: web.Application) -> None:
    app.add_routes(routes)


async def _answer(ws: web.WebSocketResponse, root: Path, cache: synctree.HashCache, message: dict[str, object]) -> None:
    if message.get("list"):
        files = await asyncio.to_thread(synctree.scan, root, cache)
        await send_json(ws, {"files": {rel: [e.size, e.mtime_ns, e.sha256] for rel, e in files.items()}})
    elif "delete" in message:
        rel = str(message["delete"])
        target = synctree.safe_relative(root, rel)
        if target is None:
            await send_json(ws, {"error": f"refusing to delete {rel[:200]!r}"})
            return
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        await send_json(ws, {"deleted": rel})
    else:
        await send_json(ws, {"error": f"an unknown message: {sorted(message)[:4]}"})


async def _release(agent: Agent, task_id: str) -> None:
    """Cancel the task the closed session owned (it may have ended already: then nothing happens)."""
    task = agent.tasks.get(task_id) if task_id else None
    if task is not None and task.record.state == TaskState.RUNNING:
        await agent.tasks.cancel(task, RELEASE_GRACE_S)
        log.info("sync session closed: task %s cancelled", task_id)


@routes.get("/v1/sync")
async def sync_session(request: web.Request) -> web.WebSocketResponse:
    agent = request.app[AGENT_KEY]
    if agent.stopping:
        raise web.HTTPConflict(text='{"error": "the machine is stopping"}', content_type="application/json")
    ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S, max_msg_size=MAX_MESSAGE_BYTES)
    await ws.prepare(request)
    root = machine_path(agent, ".")
    cache = synctree.HashCache()
    owned = ""
    with agent.people.hold("sync"):
        try:
            first = await receive(ws, FIRST_MESSAGE_TIMEOUT_S)
            owned = str(first.get("owns") or "") if isinstance(first, dict) else ""
            while True:
                message = await receive(ws)
                if isinstance(message, dict):
                    await _answer(ws, root, cache, message)
        except (SessionClosed, TimeoutError, ConnectionError):
            pass
        finally:
            # shielded: the handler itself is cancelled when the laptop's connection drops
            await asyncio.shield(_release(agent, owned))
            await ws.close()
    return ws
