"""The agent's HTTP API (Contract 4). Handlers are thin: they parse, call the Agent, and shape the answer.

Reading status, metrics, samples or logs never counts as activity: monitoring must not keep a VM alive.
Only ``POST /v1/tasks`` (through the running task) and ``POST /v1/keepalive`` do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from rawvm_agent.app import AGENT_KEY, Agent
from rawvm_agent.query import int_param, number_param
from rawvm_agent.sink_post import SinkPostError
from rawvm_agent.tasks import STREAMS, NotReadyError, Task, TaskError, read_log
from rawvm_agent.telemetry import prometheus

routes = web.RouteTableDef()

DEFAULT_LOG_LIMIT = 1 << 20
MAX_LOG_LIMIT = 16 << 20
FOLLOW_CHUNK = 1 << 16
FOLLOW_POLL_S = 1.0


@dataclass
class LogFollows:
    """How many ``follow=1`` log streams are open (``LimitsConfig.log_follows`` caps it)."""

    open: int = 0


FOLLOWS_KEY: web.AppKey[LogFollows] = web.AppKey("log_follows", LogFollows)


def add_routes(app: web.Application) -> None:
    app.add_routes(routes)
    app[FOLLOWS_KEY] = LogFollows()


def _agent(request: web.Request) -> Agent:
    return request.app[AGENT_KEY]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@routes.get("/healthz")
async def healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok")


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    agent = _agent(request)
    body = agent.sampler.render_prometheus(agent.agent_metrics())
    return web.Response(body=body.encode(), headers={"Content-Type": prometheus.CONTENT_TYPE})


@routes.get("/metrics/dcgm")
async def metrics_dcgm(request: web.Request) -> web.Response:
    """The GPU fields under dcgm-exporter's exact names and labels, for DCGM dashboards that need ``modelName``."""
    body = _agent(request).sampler.render_dcgm()
    return web.Response(body=body.encode(), headers={"Content-Type": prometheus.CONTENT_TYPE})


@routes.get("/v1/status")
async def status(request: web.Request) -> web.Response:
    """``?wait=S&phase=P``: answer once the phase is no longer P, or after S seconds (at most 10)."""
    wait = number_param(request, "wait", 0.0)
    return web.json_response(await _agent(request).status_after(request.query.get("phase", ""), wait))


@routes.get("/v1/samples")
async def samples(request: web.Request) -> web.Response:
    after = int_param(request, "after", -1, minimum=-1)
    limit = int_param(request, "limit", 3600, minimum=1)
    newest = request.query.get("newest", "") in ("1", "true", "yes")  # the last `limit` samples after `after`
    sampler = _agent(request).sampler
    if "application/json" in request.headers.get("Accept", ""):
        return web.json_response(sampler.samples_after(after, limit=limit, newest=newest))
    body = sampler.samples_after_msgpack(after, limit=limit, newest=newest)
    return web.Response(body=body, content_type="application/msgpack")


@routes.post("/v1/tasks")
async def start_task(request: web.Request) -> web.Response:
    try:
        body: Any = await request.json()
    except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than the parser goes
        return _error(400, "the request body must be JSON {argv, env, cwd, secret_env}")
    agent = _agent(request)
    limits, tasks = agent.config.limits, agent.tasks
    if len(tasks.tasks) >= limits.tasks_kept:
        return _error(429, f"this agent keeps at most {limits.tasks_kept} tasks; start a new machine")
    if len(tasks.running) >= limits.tasks_running:
        return _error(429, f"{limits.tasks_running} tasks are running, the most at once; wait for one to end")
    try:
        answer = await agent.start_task(body)
    except NotReadyError as exc:
        return _error(409, str(exc))
    except TaskError as exc:
        return _error(400, str(exc))
    return web.json_response(answer, status=201)


@routes.get("/v1/tasks")
async def list_tasks(request: web.Request) -> web.Response:
    return web.json_response([t.record.public() for t in _agent(request).tasks.tasks.values()])


@routes.get("/v1/tasks/{id}")
async def get_task(request: web.Request) -> web.Response:
    task = _agent(request).tasks.get(request.match_info["id"])
    if task is None:
        return _error(404, f"no task {request.match_info['id']!r}")
    return web.json_response(task.record.public())


@routes.get("/v1/tasks/{id}/logs")
async def task_logs(request: web.Request) -> web.StreamResponse:
    """Raw bytes of stdout or stderr from ``offset``. ``X-Next-Offset`` is where the next read starts.

    With ``follow=1`` the body streams until the task has ended and its output is drained; the next
    offset is then ``offset`` plus the bytes received (the header gives the offset the body starts at).
    """
    task = _agent(request).tasks.get(request.match_info["id"])
    if task is None:
        return _error(404, f"no task {request.match_info['id']!r}")
    stream = request.query.get("stream", "stdout")
    if stream not in STREAMS:
        return _error(400, "'stream' must be stdout or stderr")
    offset = int_param(request, "offset", 0)
    path = task.log_path(stream)
    if request.query.get("follow", "") not in ("1", "true", "yes"):
        limit = min(int_param(request, "limit", DEFAULT_LOG_LIMIT, minimum=1), MAX_LOG_LIMIT)
        data = read_log(path, offset, limit)
        headers = {"X-Next-Offset": str(offset + len(data)), "X-Task-State": task.record.state}
        return web.Response(body=data, content_type="application/octet-stream", headers=headers)

    follows, most = request.app[FOLLOWS_KEY], _agent(request).config.limits.log_follows
    if follows.open >= most:
        return _error(429, f"{most} log streams are open, the most at once; read without follow=1 or retry")
    follows.open += 1
    try:
        return await _follow(request, task, path, offset)
    finally:
        follows.open -= 1


async def _follow(request: web.Request, task: Task, path: Path, offset: int) -> web.StreamResponse:
    response = web.StreamResponse(headers={"X-Next-Offset": str(offset), "Content-Type": "application/octet-stream"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    position = offset
    while True:
        data = read_log(path, position, FOLLOW_CHUNK)
        if data:
            await response.write(data)
            position += len(data)
            continue
        if task.done.is_set():
            # The pumps finish before ``done`` is set, so an empty read now means the end.
            break
        await task.wait_change(FOLLOW_POLL_S)
    await response.write_eof()
    return response


@routes.post("/v1/keepalive")
async def keepalive(request: web.Request) -> web.Response:
    agent = _agent(request)
    agent.keepalive()
    return web.json_response({"ok": True, "client_timeout_s": agent.config.idle.client_timeout})


@routes.put("/v1/sink")
async def put_sink(request: web.Request) -> web.Response:
    """This machine's own sink upload (``sink_post``), handed by the laptop once the machine serves. The body is
    never echoed or logged: it holds a signed form."""
    try:
        body: Any = await request.json()
    except (ValueError, RecursionError):
        return _error(400, "the request body must be JSON {url, fields}")
    try:
        _agent(request).hand_sink(body)
    except SinkPostError as exc:
        return _error(400, str(exc))
    return web.json_response({"ok": True})


@routes.post("/v1/shutdown")
async def shutdown(request: web.Request) -> web.Response:
    agent = _agent(request)
    agent.request_stop("shutdown requested through the API")
    return web.json_response({"phase": "stopping"}, status=202)
