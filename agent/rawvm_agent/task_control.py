"""Routes that steer tasks already running, and what later tasks inherit:

- ``POST /v1/tasks/{id}/cancel?grace=S``: SIGTERM to the task's process group, SIGKILL after ``grace`` seconds
  (default 5); its output so far is kept and it ends in state ``cancelled``. Answers the task's record once it
  has ended. A task already ended is answered as it is (cancelling twice is harmless).
- ``PUT /v1/env``: ``{"env": {NAME: value}, "secret_env": [NAME, ...]}`` that every task started afterwards gets
  (batch tasks, call workers and Dask processes included). The names in ``secret_env`` are secrets: their values
  are masked in every log line and output stream from now on. Kept in memory only: the agent never writes them
  to its state dir (which it flushes to the sink), so a restarted agent has to be handed them again.
- ``POST /v1/batch/cancel?grace=S``: this machine's share of a batch array stops: its queued ids end as
  cancelled (failed) results without starting, its running tasks are cancelled as above.
- ``POST /v1/calls/cancel?client=C``: ``@rawvm.function`` client C's queued calls are dropped and the workers
  running its calls cancelled (those calls end LOST).

Separate from api.py so another route module can add its own task routes without touching this one.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from rawvm_agent.app import AGENT_KEY
from rawvm_agent.query import number_param
from rawvm_agent.tasks import KILL_GRACE_S, TaskError, TaskRequest

routes = web.RouteTableDef()
MAX_GRACE_S = 60.0


def add_routes(app: web.Application) -> None:
    app.add_routes(routes)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@routes.post("/v1/tasks/{id}/cancel")
async def cancel_task(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    task = agent.tasks.get(request.match_info["id"])
    if task is None:
        return _error(404, f"no task {request.match_info['id']!r}")
    grace = min(number_param(request, "grace", KILL_GRACE_S), MAX_GRACE_S)
    await agent.tasks.cancel(task, grace)
    await task.done.wait()  # the pumps have drained its pipes: every byte it wrote is in its logs
    return web.json_response(task.record.public())


@routes.put("/v1/env")
async def put_env(request: web.Request) -> web.Response:
    """The environment later tasks inherit. The body is never echoed or logged: it may hold secrets."""
    try:
        body: Any = await request.json()
    except (ValueError, RecursionError):
        return _error(400, "the request body must be JSON {env, secret_env}")
    if not isinstance(body, dict):
        return _error(400, "the request body must be JSON {env, secret_env}")
    try:
        # The same checks as a task's own env and secret names.
        checked = TaskRequest.from_json({"argv": ["-"], "env": body.get("env"), "secret_env": body.get("secret_env")})
    except TaskError as exc:
        return _error(400, str(exc))
    agent = request.app[AGENT_KEY]
    agent.redactor.add(*(checked.env[n] for n in checked.secret_env if checked.env.get(n)))
    agent.environ.update(checked.env)  # the base environment every TaskManager.start call is given
    agent.batch.env_handed.set()  # a batch whose spec names secrets may start
    return web.json_response({"ok": True, "names": sorted(checked.env)})


@routes.post("/v1/batch/cancel")
async def cancel_batch(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    grace = min(number_param(request, "grace", KILL_GRACE_S), MAX_GRACE_S)
    if not agent.batch.configured:
        return _error(404, "no batch on this machine")
    skipped = agent.batch.cancel()
    running = [t for tid in agent.batch.running.values() if tid and (t := agent.tasks.get(tid)) is not None]
    await asyncio.gather(*(agent.tasks.cancel(t, grace) for t in running))
    return web.json_response({"skipped": skipped, "cancelled": [t.record.id for t in running]})


@routes.post("/v1/calls/cancel")
async def cancel_calls(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    client = request.query.get("client", "")
    if not client or len(client) > 64:
        return _error(400, "'client' (1 to 64 characters) is required")
    dropped, workers = agent.calls.cancel_client(client)
    await asyncio.gather(*(agent.tasks.cancel(t, KILL_GRACE_S) for t in workers))
    return web.json_response({"dropped": dropped, "workers_cancelled": len(workers)})
