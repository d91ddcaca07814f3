"""The batch part of the agent API (behind the bearer token like the rest; see docs/architecture.md).

``GET /v1/batch`` this machine's queue; ``GET /v1/batch/results?after=N`` final results from the N-th on;
``POST /v1/batch/share {index}`` gives a machine without one its share; ``POST /v1/batch/adopt {ids}`` hands it
the unfinished tasks of a machine that died.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from rawvm_agent.app import AGENT_KEY
from rawvm_agent.batch import BatchError, BatchRunner
from rawvm_agent.query import int_param

routes = web.RouteTableDef()


def add_routes(app: web.Application) -> None:
    app.add_routes(routes)


def _runner(request: web.Request) -> BatchRunner:
    return request.app[AGENT_KEY].batch


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text='{"error": "the body must be a JSON object"}', content_type="application/json")
    return body


@routes.get("/v1/batch")
async def batch_status(request: web.Request) -> web.Response:
    return web.json_response(_runner(request).status())


@routes.get("/v1/batch/results")
async def batch_results(request: web.Request) -> web.Response:
    return web.json_response(_runner(request).results_after(int_param(request, "after", 0)))


@routes.post("/v1/batch/share")
async def batch_share(request: web.Request) -> web.Response:
    body = await _body(request)
    runner = _runner(request)
    try:
        runner.set_index(body.get("index"))
    except BatchError as exc:
        return web.json_response({"error": str(exc)}, status=409 if not runner.configured else 400)
    return web.json_response({"index": runner.index})


@routes.post("/v1/batch/adopt")
async def batch_adopt(request: web.Request) -> web.Response:
    body = await _body(request)
    runner = _runner(request)
    try:
        new = runner.adopt(body.get("ids"))
    except BatchError as exc:
        return web.json_response({"error": str(exc)}, status=409 if runner.spec is None else 400)
    return web.json_response({"adopted": new})
