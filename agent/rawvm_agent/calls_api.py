"""The HTTP side of function calls (``@rawvm.function``): ``/v1/calls`` for clients, the work path for workers.

Handlers are thin: they read the framed bodies (call_worker's format), check the query, and hand over to the
agent's CallHub (calls.py), which holds the queue and the workers. Split from calls.py so the hub does not
depend on the web application that holds the agent.
"""

from __future__ import annotations

from aiohttp import web

from rawvm_agent import call_worker
from rawvm_agent.app import AGENT_KEY
from rawvm_agent.call_worker import ERROR, FrameError, pack, unpack
from rawvm_agent.calls import MAX_CLIENT_WAIT_S, MAX_REQUEST_BYTES, CallHub
from rawvm_agent.query import bad_request, int_param, number_param
from rawvm_agent.tasks import NotReadyError, TaskError

routes = web.RouteTableDef()


def add_routes(app: web.Application) -> None:
    app.add_routes(routes)


def hub(request: web.Request) -> CallHub:
    return request.app[AGENT_KEY].calls


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _read_body(request: web.Request) -> bytes:
    """The whole body, refusing more than MAX_REQUEST_BYTES (the app's client_max_size is for JSON bodies)."""
    if request.content_length is not None and request.content_length > MAX_REQUEST_BYTES:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_REQUEST_BYTES, actual_size=request.content_length)
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(1 << 20):
        size += len(chunk)
        if size > MAX_REQUEST_BYTES:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_REQUEST_BYTES, actual_size=size)
        chunks.append(chunk)
    return b"".join(chunks)


def _frames(data: bytes) -> list[tuple[int, int, bytes]]:
    try:
        return unpack(data)
    except FrameError as exc:
        raise bad_request(f"bad call batch: {exc}") from None


def _client(request: web.Request) -> str:
    client = request.query.get("client", "")
    if not client or len(client) > 64:
        raise bad_request("'client' (1 to 64 characters) is required")
    return client


def _octets(data: bytes) -> web.Response:
    return web.Response(body=data, content_type="application/octet-stream")


@routes.post("/v1/calls")
async def submit_calls(request: web.Request) -> web.Response:
    calls = hub(request)
    client = _client(request)
    frames = _frames(await _read_body(request))
    try:
        queued = await calls.submit(client, frames, int_param(request, "slots", 0))
    except NotReadyError as exc:
        return _error(409, str(exc))
    except TaskError as exc:
        return _error(429, str(exc))
    return web.json_response({"queued": queued, "workers": len(calls.workers)}, status=202)


@routes.get("/v1/calls/results")
async def call_results(request: web.Request) -> web.Response:
    wait = min(number_param(request, "wait", 0.0), MAX_CLIENT_WAIT_S)
    return _octets(pack(await hub(request).results_for(_client(request), wait)))


@routes.get("/v1/calls")
async def call_stats(request: web.Request) -> web.Response:
    return web.json_response(hub(request).stats())


@routes.post(call_worker.WORK_PATH)
async def worker_exchange(request: web.Request) -> web.Response:
    calls = hub(request)
    done = _frames(await _read_body(request))
    if any(status not in (0, ERROR) for _, status, _ in done):
        return _error(400, "a worker reports status 0 (ok) or 1 (error)")
    try:
        batch = await calls.work(request.query.get("worker", ""), done, int_param(request, "max", 1))
    except KeyError:
        return _error(404, "no such call worker")
    if calls.leaving() and not batch:
        return _error(410, "the agent is stopping")
    return _octets(pack(batch))
