"""The spot watcher against a real HTTP server on loopback that speaks IMDS the way EC2 does with IMDSv2
required: a token from ``PUT /latest/api/token`` (TTL header mandatory, 1..21600 s), every GET must carry
a live token, a GET without one (IMDSv1) gets 401. The server counts what it was sent, so the tests can
assert that IMDSv1 was never used."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from rawvm_agent.config import SpotConfig
from rawvm_agent.spot import watch_spot

NOTICE = {"action": "terminate", "time": "2026-11-24T22:00:00Z"}
POLL = 0.05


class Imds:
    def __init__(self, announce_after: int, failures: int = 0) -> None:
        self.announce_after = announce_after  # polls answered 404 before the notice appears
        self.failures = failures  # polls answered 500 first (a flaky metadata service)
        self.tokens: dict[str, float] = {}  # token -> expiry (monotonic)
        self.token_puts = 0
        self.renewed_early = 0  # PUTs made while an earlier token was still valid
        self.polls = 0  # GETs with a valid token
        self.v1_gets = 0  # GETs without any token
        self.rejected = 0  # GETs with an unknown or expired token
        self.forget_after: int | None = None  # drop every token after this many polls (IMDS restart)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_put("/latest/api/token", self.put_token)
        app.router.add_get("/latest/meta-data/spot/instance-action", self.instance_action)
        return app

    async def put_token(self, request: web.Request) -> web.Response:
        ttl = request.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            return web.Response(status=400)
        self.token_puts += 1
        if any(expiry > time.monotonic() for expiry in self.tokens.values()):
            self.renewed_early += 1
        token = secrets.token_urlsafe(32)
        self.tokens[token] = time.monotonic() + int(ttl)
        return web.Response(text=token, headers={"X-aws-ec2-metadata-token-ttl-seconds": ttl})

    async def instance_action(self, request: web.Request) -> web.Response:
        token = request.headers.get("X-aws-ec2-metadata-token")
        if token is None:
            self.v1_gets += 1
            return web.Response(status=401)
        if self.tokens.get(token, 0.0) <= time.monotonic():
            self.rejected += 1
            return web.Response(status=401)
        self.polls += 1
        if self.forget_after is not None and self.polls == self.forget_after:
            self.tokens.clear()
        if self.polls <= self.failures:
            return web.Response(status=500)
        if self.polls <= self.failures + self.announce_after:
            return web.Response(status=404, text="Not Found")
        return web.json_response(NOTICE)


async def serve(imds: Imds) -> TestServer:
    server = TestServer(imds.app(), host="127.0.0.1")
    await server.start_server()
    return server


def recorder() -> tuple[list[str], Callable[[str], Awaitable[None]]]:
    notices: list[str] = []

    async def on_notice(text: str) -> None:
        notices.append(text)

    return notices, on_notice


async def watch(imds: Imds, **kwargs: int) -> list[str]:
    server = await serve(imds)
    try:
        notices, on_notice = recorder()
        config = SpotConfig(enabled=True, imds_url=str(server.make_url("/")), poll=POLL)
        await asyncio.wait_for(watch_spot(config, on_notice, **kwargs), 60)
        return notices
    finally:
        await server.close()


async def test_notice_is_seen_on_the_first_poll_after_it_appears_with_imdsv2_only() -> None:
    imds = Imds(announce_after=3)
    notices = await watch(imds)
    assert [json.loads(n) for n in notices] == [NOTICE]  # handed over once, then the watcher returns
    assert imds.polls == 4  # 3 x 404, then the notice: not a poll period later
    assert imds.v1_gets == 0 and imds.rejected == 0
    assert imds.token_puts == 1  # one session token, reused while it lives


async def test_token_is_renewed_before_it_expires() -> None:
    imds = Imds(announce_after=30)  # 30 polls of 0.05 s outlive several 1-second tokens
    notices = await watch(imds, token_ttl=1)
    assert len(notices) == 1
    assert imds.token_puts >= 2 and imds.renewed_early >= 1  # renewed while the old token still lived
    assert imds.v1_gets == 0


async def test_a_rejected_token_is_replaced_and_polling_goes_on() -> None:
    imds = Imds(announce_after=5)
    imds.forget_after = 2  # IMDS forgets every token (as after a restart)
    notices = await watch(imds)
    assert len(notices) == 1
    assert imds.rejected == 1 and imds.token_puts == 2 and imds.v1_gets == 0


async def test_a_failing_imds_is_survived(caplog: pytest.LogCaptureFixture) -> None:
    imds = Imds(announce_after=1, failures=3)
    notices = await watch(imds)
    assert len(notices) == 1 and imds.v1_gets == 0
    warnings = [r for r in caplog.records if "still polling" in r.getMessage()]
    assert len(warnings) == 1  # the same error three times in a row is logged once


async def test_disabled_watcher_returns_without_a_request() -> None:
    imds = Imds(announce_after=0)
    server = await serve(imds)
    try:
        notices, on_notice = recorder()
        config = SpotConfig(enabled=False, imds_url=str(server.make_url("/")), poll=POLL)
        await asyncio.wait_for(watch_spot(config, on_notice), 5)
    finally:
        await server.close()
    assert notices == [] and imds.token_puts == 0 and imds.polls == 0
