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

from rawvm_agent import api, batch_api, calls_api, sdnotify
from rawvm_agent.api_errors import json_errors
from rawvm_agent.app import AGENT_KEY, Agent
from rawvm_agent.auth import token_middleware
from rawvm_agent.config import AgentConfig
from rawvm_agent.logs import setup_logging

log = logging.getLogger("rawvm_agent")


def create_app(agent: Agent) -> web.Application:
    """The aiohttp application: token middleware, Contract 4 routes, the agent started and closed with it."""
    app = web.Application(middlewares=[json_errors, token_middleware(agent.token)], client_max_size=1 << 20)
    app[AGENT_KEY] = agent
    # Every route of Contract 4 is registered here, in one place: the route modules import app.py for AGENT_KEY,
    # so app.py must not import them.
    api.add_routes(app)
    calls_api.add_routes(app)  # @rawvm.function calls
    batch_api.add_routes(app)

    async def on_startup(_: web.Application) -> None:
        await agent.start()

    async def on_cleanup(_: web.Application) -> None:
        await agent.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def server_ssl_context(config: AgentConfig) -> ssl.SSLContext | None:
    """The API's TLS context when agent.toml sets a certificate and key; None for plain HTTP."""
    if not (config.tls_cert or config.tls_key):
        return None
    if not (config.tls_cert and config.tls_key):
        raise ValueError("agent.toml: set both tls_cert and tls_key, or neither")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(config.tls_cert, config.tls_key)
    return ctx


async def serve(config: AgentConfig) -> int:
    """Run the agent and its API until it has powered off or a signal asks it to leave; the exit code."""
    agent = Agent(config)
    setup_logging(agent.redactor, agent.log_file)
    app = create_app(agent)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.bind, config.port, ssl_context=server_ssl_context(config))
        await site.start()
        log.info("API listening on %s://%s:%d", "https" if config.tls_cert else "http", config.bind, config.port)
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
