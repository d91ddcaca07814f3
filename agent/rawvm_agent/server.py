"""The HTTP server in front of the Agent: the aiohttp application (middlewares and every route), TLS, and
``serve``, which runs both until the agent has powered off or the process is told to leave.

Separate from app.py (the Agent itself) because the route modules (api.py, calls_api.py, batch_api.py) read the
Agent through app.AGENT_KEY: the application that collects them must sit above all of them.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl

from aiohttp import web

from rawvm_agent import (
    api,
    batch_api,
    call_worker,
    calls_api,
    code_sync,
    interactive_api,
    sdnotify,
    sync_api,
    task_control,
)
from rawvm_agent.api_errors import json_errors
from rawvm_agent.app import AGENT_KEY, Agent
from rawvm_agent.auth import digest, token_middleware
from rawvm_agent.config import AgentConfig
from rawvm_agent.logs import setup_logging
from rawvm_agent.prefetch import BundlePrefetch

log = logging.getLogger("rawvm_agent")


def create_app(agent: Agent) -> web.Application:
    """The aiohttp application: token middleware, Contract 4 routes, the agent started and closed with it. It
    speaks whatever its site serves: ``serve`` puts it behind mutual TLS (tests may serve it plainly)."""
    worker = (call_worker.WORK_PATH, digest(agent.calls.worker_token))  # the call workers' own token
    auth = token_middleware(agent.token_sha256, worker=worker)
    app = web.Application(middlewares=[json_errors, auth], client_max_size=1 << 20)
    app[AGENT_KEY] = agent
    # Every route of Contract 4 is registered here, in one place: the route modules import app.py for AGENT_KEY,
    # so app.py must not import them.
    api.add_routes(app)
    calls_api.add_routes(app)  # @rawvm.function calls
    batch_api.add_routes(app)
    task_control.add_routes(app)  # cancel a task (Ctrl-C, rawvm cancel, gang jobs), env later tasks inherit
    code_sync.add_routes(app)  # fresh code on a warm machine
    interactive_api.add_routes(app)  # shell, files, forward: websockets for a person (rawvm shell/cp/forward)
    sync_api.add_routes(app)  # rawvm notebook's two-way sync; closing it cancels the notebook server

    async def on_startup(_: web.Application) -> None:
        await agent.start()

    async def on_cleanup(_: web.Application) -> None:
        await agent.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def server_ssl_context(config: AgentConfig) -> ssl.SSLContext:
    """The API's mutual-TLS context: the agent's certificate, and a client certificate signed by the cluster CA
    required of every connection (a stranger without one is refused before any HTTP is read). No config without
    TLS passes ``AgentConfig.check_channel``."""
    config.check_channel()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(config.tls_cert, config.tls_key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=config.tls_ca)  # the cluster CA only, never the system store
    return ctx


async def serve(config: AgentConfig, *, prefetch: BundlePrefetch | None = None) -> int:
    """Run the agent and its API until it has powered off or a signal asks it to leave; the exit code.
    ``prefetch``: the bundle's downloads begun before the imports (prefetch.py)."""
    context = server_ssl_context(config)  # before anything starts: no TLS, no agent
    agent = Agent(config, prefetch=prefetch)
    setup_logging(agent.redactor, agent.log_file)
    app = create_app(agent)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.bind, config.port, ssl_context=context)
        await site.start()
        log.info("API listening on https://%s:%d (mutual TLS)", config.bind, config.port)
        sdnotify.notify(sdnotify.READY)
        leave = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, leave.set)
        waiters = [asyncio.ensure_future(leave.wait()), asyncio.ensure_future(agent.stopped.wait())]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        if leave.is_set() and not agent.stopped.is_set():
            log.info("signal received; leaving without powering off (state saved)")
        sdnotify.notify(sdnotify.STOPPING)
    finally:
        await runner.cleanup()
    return agent.exit_code
