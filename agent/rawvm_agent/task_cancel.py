"""``POST /v1/tasks/{id}/cancel``: end one task now, keeping its output.

A gang job (``rawvm run -n N``) is all or nothing: when one node fails, the laptop cancels the others' tasks so no
node keeps training alone. The task's process group gets SIGTERM (so a trainer may save a checkpoint), then SIGKILL
after ``grace`` seconds; its record ends ``interrupted`` with the exit code the signal gave, and its stdout/stderr
stay as written. Cancelling a task that has already ended changes nothing. Kept in its own module (one function,
one route) so the agent's other routes stay as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from aiohttp import web

from rawvm_agent.app import AGENT_KEY
from rawvm_agent.query import number_param
from rawvm_agent.tasks import Task, TaskState

log = logging.getLogger("rawvm_agent.task_cancel")

routes = web.RouteTableDef()
CANCEL_GRACE_S = 5.0
MAX_GRACE_S = 300.0


def add_routes(app: web.Application) -> None:
    app.add_routes(routes)


def _signal_group(task: Task, sig: signal.Signals) -> None:
    """``sig`` to the task's process group (it runs in its own session), unless it has already exited."""
    if task.process is None or task.process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(task.process.pid, sig)


async def cancel_task(task: Task, grace: float = CANCEL_GRACE_S) -> bool:
    """End ``task``: SIGTERM to its process group, SIGKILL after ``grace`` if it is still running; returns once it
    has ended (or another ``grace`` passed after the SIGKILL). False when it had already ended."""
    if task.done.is_set() or task.record.state != TaskState.RUNNING:
        return False
    task.record.state = TaskState.INTERRUPTED  # _run keeps a state other than RUNNING when the process exits
    task.save()
    log.info("task %s cancelled: SIGTERM, SIGKILL after %gs", task.record.id, grace)
    _signal_group(task, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(task.done.wait(), grace)
        return True
    _signal_group(task, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(task.done.wait(), grace)
    return True


@routes.post("/v1/tasks/{id}/cancel")
async def cancel(request: web.Request) -> web.Response:
    """Cancel a task (``?grace=S``, default 5 s, before the SIGKILL); answers its record once it has ended."""
    task = request.app[AGENT_KEY].tasks.get(request.match_info["id"])
    if task is None:
        return web.json_response({"error": f"no task {request.match_info['id']!r}"}, status=404)
    grace = min(number_param(request, "grace", CANCEL_GRACE_S), MAX_GRACE_S)
    cancelled = await cancel_task(task, grace)
    return web.json_response({**task.record.public(), "cancelled": cancelled})
