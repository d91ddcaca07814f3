"""Fuzz the agent API of a real agent process on loopback: over 100 000 requests to every endpoint.

Two phases against one agent (``python -m rawvm_agent``, the agent's own Python as its environment):

1. strangers only: no token or a wrong one, every endpoint (shutdown and keepalive included), random methods,
   paths, query strings, headers, JSON and binary bodies, huge and truncated bodies, malformed requests.
   Nothing may be served but ``/healthz`` and the idle clock must not move;
2. the same mix with the right token on half of the requests (never on ``/v1/shutdown``), plus slow clients
   that send their requests a byte at a time.

Throughout: no answer >= 500, every error answered is one line of JSON; at the end the agent still answers
and its memory grew by less than ``RSS_GROWTH_LIMIT``. The generator is seeded, so a failure replays.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests import reliability
from tests.agent.core_helpers import TOKEN, agent_config
from tests.agent.test_agent_process import AgentProcess
from tests.fuzz.http_fuzz import Connection, Generator, Request, Response, protocol_error, read_response

pytestmark = [pytest.mark.faults, pytest.mark.slow]

STRANGER_REQUESTS = 60_000
MIXED_REQUESTS = 44_000
WORKERS = 12
RSS_GROWTH_LIMIT = 64 << 20
SEED = 12


@dataclass
class Findings:
    sent: int = 0
    answered: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    errors_5xx: list[str] = field(default_factory=list)
    served_to_strangers: list[str] = field(default_factory=list)
    not_json: list[str] = field(default_factory=list)
    task_ids: list[str] = field(default_factory=list)
    protocol_errors: int = 0  # plain 400s from aiohttp's HTTP parser

    def check(self, request: Request, response: Response | None) -> None:
        if response is None:
            return
        self.answered += 1
        self.statuses[response.status] += 1
        what = f"{request.method} {request.path[:80]!r} -> {response.status} {response.body[:120]!r}"
        if response.status >= 500:
            self.errors_5xx.append(what)
        public = request.path == "/healthz"
        if not request.authorized and not public and request.shape != "malformed" and response.status < 400:
            self.served_to_strangers.append(what)
        if protocol_error(response):
            self.protocol_errors += 1
        elif response.status >= 400 and request.method != "HEAD" and request.shape != "malformed":
            try:
                error = json.loads(response.body)["error"]
                if not isinstance(error, str) or "\n" in error or not error:
                    self.not_json.append(what)
            except (ValueError, KeyError, TypeError):
                self.not_json.append(what)
        if response.status == 201 and request.path == "/v1/tasks":
            self.task_ids.append(json.loads(response.body)["id"])


async def one_shot(port: int, request: Request, findings: Findings, tls: ssl.SSLContext) -> None:
    """Requests that end their connection: malformed, truncated (the client hangs up short), huge."""
    connection = Connection("127.0.0.1", port, tls)
    await connection.open()
    assert connection.writer is not None and connection.reader is not None
    try:
        connection.writer.write(request.raw)
        if request.shape == "truncated":  # TLS has no half-close: hanging up short is closing
            await connection.writer.drain()
            await connection.close()
            return
        await connection.writer.drain()
        response = await asyncio.wait_for(read_response(connection.reader), 10)
    except (ConnectionError, OSError, asyncio.IncompleteReadError, ValueError, IndexError, TimeoutError):
        response = None
    finally:
        await connection.close()
    findings.check(request, response)


async def fire(port: int, generator: Generator, total: int, findings: Findings, tls: ssl.SSLContext) -> None:
    remaining = [total]

    async def worker() -> None:
        connection = Connection("127.0.0.1", port, tls)
        while remaining[0] > 0:
            remaining[0] -= 1
            request = generator.next()
            findings.sent += 1
            if request.shape != "normal":
                await one_shot(port, request, findings, tls)
                continue
            response = await connection.exchange(request.raw, head_request=request.method == "HEAD")
            findings.check(request, response)
            if findings.task_ids and len(generator.task_ids) < len(findings.task_ids):
                generator.task_ids[:] = findings.task_ids[-50:]
        await connection.close()

    await asyncio.gather(*(worker() for _ in range(WORKERS)))


async def slow_clients(port: int, stop: asyncio.Event, findings: Findings, tls: ssl.SSLContext) -> None:
    """A byte at a time, with and without the token; and one that stalls half way through its headers."""

    async def dribble(authorized: bool) -> None:
        auth = f"Authorization: Bearer {TOKEN}\r\n" if authorized else ""
        raw = f"GET /v1/status HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode()
        request = Request(raw=raw, authorized=authorized, path="/v1/status", method="GET")
        while not stop.is_set():
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
            for i in range(len(raw)):
                writer.write(raw[i : i + 1])
                await writer.drain()
                await asyncio.sleep(0.005)
            findings.sent += 1
            response = await asyncio.wait_for(read_response(reader), 30)
            findings.check(request, response)
            assert response is not None and response.status == (200 if authorized else 401)
            writer.close()

    async def stall() -> None:
        while not stop.is_set():
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
            writer.write(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nAuthor")
            await writer.drain()
            await asyncio.sleep(3)
            writer.write(b"ization: Bearer nope\r\n\r\n")
            await writer.drain()
            findings.sent += 1
            request = Request(raw=b"", authorized=False, path="/v1/status", method="GET")
            findings.check(request, await asyncio.wait_for(read_response(reader), 30))
            writer.close()

    await asyncio.gather(dribble(True), dribble(False), stall())


async def answered_without_certificate(port: int, ca: Path, tries: int = 200) -> int:
    """Requests carrying the right token, over TLS with the CA pinned but no client certificate, and over plain
    TCP: how many got an HTTP answer."""
    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.check_hostname = False
    no_cert.load_verify_locations(cafile=str(ca))
    raw = f"GET /v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
    answered = 0
    for i in range(tries):
        connection = Connection("127.0.0.1", port, no_cert if i % 2 else None)
        try:
            response = await connection.exchange(raw, timeout=10)
        except (OSError, ssl.SSLError, TimeoutError):
            response = None
        finally:
            await connection.close()
        answered += response is not None
    return answered


def status_of(agent: AgentProcess) -> dict[str, Any]:
    status: dict[str, Any] = agent.json("GET", "/v1/status")
    return status


def idle_clock(status: dict[str, Any]) -> tuple[Any, ...]:
    idle = status["idle"]
    return (idle["idle_since"], idle["last_keepalive"], status["tasks"]["total"], status["phase"], status["restarts"])


def test_100k_fuzzed_requests_no_5xx_no_stranger_served_agent_still_up(
    tmp_path: Path, start_agent: Callable[..., AgentProcess]
) -> None:
    marker = tmp_path / "powered-off"
    config = agent_config(
        tmp_path / "state",
        telemetry={"interval": "1s"},
        idle={"keepalive": "1h", "client_timeout": "1s", "poweroff_command": ["touch", str(marker)]},
    )
    agent = start_agent(config)
    agent.wait(lambda s: s["phase"] == "idle")
    process = psutil.Process(agent.proc.pid)
    port = int(config["port"])
    tls = agent.channel.context()  # the cluster's client certificate: the fuzzing is of the API behind it
    findings = Findings()
    started = time.monotonic()

    async def strangers() -> None:
        await fire(port, Generator(TOKEN, SEED, auth_share=0.0), 2_000, findings, tls)  # warm up before measuring

    asyncio.run(strangers())
    rss_before = process.memory_info().rss
    clock_before = idle_clock(status_of(agent))

    asyncio.run(fire(port, Generator(TOKEN, SEED + 1, auth_share=0.0), STRANGER_REQUESTS, findings, tls))
    # With the right token but without the client certificate (TLS, or plain TCP), nothing is ever answered.
    served_without_certificate = asyncio.run(answered_without_certificate(port, agent.channel.laptop.ca))
    clock_after = idle_clock(status_of(agent))
    stranger_phase = dict(findings.statuses)

    async def mixed() -> None:
        stop = asyncio.Event()
        slow = asyncio.ensure_future(slow_clients(port, stop, findings, tls))
        await fire(port, Generator(TOKEN, SEED + 2, auth_share=0.5), MIXED_REQUESTS, findings, tls)
        stop.set()
        await asyncio.wait_for(slow, 60)

    asyncio.run(mixed())
    elapsed = time.monotonic() - started
    rss_after = process.memory_info().rss

    assert agent.request("GET", "/healthz", token=None)[:2] == (200, b"ok")
    final = status_of(agent)
    assert final["phase"] in ("idle", "busy") and not marker.exists()
    print(
        f"fuzzed {findings.sent} requests in {elapsed:.1f}s ({findings.sent / elapsed:.0f}/s), "
        f"{findings.answered} answered; statuses {dict(sorted(findings.statuses.items()))}; "
        f"strangers-only phase {dict(sorted(stranger_phase.items()))}; {len(findings.task_ids)} tasks started; "
        f"{findings.protocol_errors} refused by the HTTP parser; "
        f"RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB"
    )
    reliability.count("requests_fuzzed", findings.sent)
    reliability.count("responses_5xx", len(findings.errors_5xx))
    reliability.count("unauthenticated_served", len(findings.served_to_strangers))
    reliability.count("served_without_client_certificate", served_without_certificate)
    reliability.count("idle_clock_moved", int(clock_before != clock_after))
    reliability.count("rss_growth_kib", max(0, rss_after - rss_before) // 1024)

    assert findings.sent >= 100_000
    assert findings.errors_5xx == [], findings.errors_5xx[:10]
    assert findings.served_to_strangers == [], findings.served_to_strangers[:10]
    assert served_without_certificate == 0
    assert findings.not_json == [], findings.not_json[:10]
    assert clock_before == clock_after  # 60 000 strangers' requests, keepalive and tasks included: no activity
    assert stranger_phase.get(401, 0) > STRANGER_REQUESTS * 0.7  # the rest: /healthz, and what the parser refused
    assert findings.statuses[201] > 0 and findings.statuses[200] > 0  # the right token did get through
    assert rss_after - rss_before < RSS_GROWTH_LIMIT
