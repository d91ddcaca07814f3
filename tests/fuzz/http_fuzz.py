"""A bounded HTTP fuzzer for the agent API: a seeded generator of requests and a raw HTTP/1.1 client.

The client speaks HTTP over plain asyncio streams (not aiohttp's client) so it can send what no well-behaved
client would: garbage methods and request lines, broken headers, bodies shorter than their Content-Length,
bodies over the server's limit, bytes one at a time. Requests on one connection reuse it (keep-alive) until
the server closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import ssl
import string
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

ENDPOINTS = [
    ("GET", "/healthz"),
    ("GET", "/metrics"),
    ("GET", "/v1/status"),
    ("GET", "/v1/samples"),
    ("POST", "/v1/tasks"),
    ("GET", "/v1/tasks"),
    ("GET", "/v1/tasks/{id}"),
    ("GET", "/v1/tasks/{id}/logs"),
    ("POST", "/v1/keepalive"),
    ("POST", "/v1/shutdown"),
    ("GET", "/v1/batch/results"),
    ("GET", "/v1/calls"),
]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "get", "BREW", "M" * 40]
QUERY_KEYS = ["after", "limit", "offset", "stream", "follow", "x", "", "a[b]", "%00"]
QUERY_VALUES = [
    "0",
    "-1",
    "1",
    "-2",
    "x",
    "",
    "1e9",
    "99999999999999999999999",
    "stdout",
    "stderr",
    "stdin",
    "1",
    "true",
    "%ff",
    "%00",
    "\u00e9",
    " ",
    "0x10",
    "3.5",
    "-0",
    # What int() or str.isdigit() take but an HTTP client should not send (``after=\u00b2`` was a 500).
    "\u00b2",
    "\u0661\u0662",
    "\uff19",
    "1_0",
    "+1",
    " 1",
    "nan",
]


def random_text(rng: random.Random, n: int) -> str:
    alphabet = string.printable + "\u00e9\u4e2d\U0001f600\x00\x01\x7f\ud7ff"
    return "".join(rng.choice(alphabet) for _ in range(n))


def random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 2**63, 1.5, 1e308, -0.0])
    if kind in (3, 4, 5):
        return random_text(rng, rng.randrange(0, 12))
    if kind in (6, 7):
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    return {random_text(rng, rng.randrange(0, 6)): random_json(rng, depth + 1) for _ in range(rng.randrange(0, 4))}


def task_body(rng: random.Random) -> Any:
    """Mostly shaped like a task request, with every field wrong in some way now and then."""
    roll = rng.random()
    if roll < 0.15:
        return random_json(rng)
    argv: Any = [random_text(rng, rng.randrange(0, 10)) for _ in range(rng.randrange(0, 4))]
    if rng.random() < 0.1:
        argv = rng.choice([["true"], ["sh", "-c", "exit 3"], ["/nonexistent/rawvm-fuzz"]])
    body: dict[str, Any] = {"argv": argv if rng.random() > 0.1 else random_json(rng)}
    if rng.random() < 0.5:
        body["env"] = {random_text(rng, rng.randrange(0, 5)): random_text(rng, 3) for _ in range(rng.randrange(3))}
    if rng.random() < 0.4:
        body["cwd"] = rng.choice(["", ".", "..", "../../..", "/", "/etc", "a/../..", "\x00", random_text(rng, 8)])
    if rng.random() < 0.3:
        body["secret_env"] = random_json(rng) if rng.random() < 0.5 else ["A", "B"]
    return body


@dataclass
class Request:
    raw: bytes
    authorized: bool  # carries the right token
    path: str  # the path part, as sent
    method: str
    shape: str = "normal"  # normal | truncated | malformed | huge


@dataclass
class Generator:
    """Seeded and bounded: the same seed gives the same requests."""

    token: str
    seed: int
    auth_share: float  # how often a request carries the right token
    task_ids: list[str] = field(default_factory=list)  # real ids learnt from 201 answers

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def authorization(self) -> tuple[str | None, bool]:
        rng = self.rng
        if rng.random() < self.auth_share:
            return rng.choice([f"Bearer {self.token}", f"bearer {self.token}", f"Bearer  {self.token} "]), True
        return rng.choice(
            [
                None,
                "",
                "Bearer",
                "Bearer ",
                f"Bearer {self.token}x",
                f"Bearer {self.token[:-1]}",
                f"Basic {self.token}",
                f"Token {self.token}",
                f"{self.token}",
                "Bearer " + random_text(rng, 30).replace("\r", "").replace("\n", ""),
                "Bearer " + "A" * 8000,
                f"Bearer {self.token.upper()}",
            ]
        ), False

    def path(self) -> tuple[str, str]:
        rng = self.rng
        method, template = rng.choice(ENDPOINTS)
        task_id = rng.choice(self.task_ids) if self.task_ids and rng.random() < 0.5 else random_text(rng, 8)
        path = template.replace("{id}", quote(task_id, safe=""))
        roll = rng.random()
        if roll < 0.05:
            path = "/" + quote(random_text(rng, rng.randrange(1, 40)), safe="/%")
        elif roll < 0.07:
            path = path + "/"
        elif roll < 0.08:
            path = "/" + "a/" * 2000
        elif roll < 0.09:
            path = path.replace("/v1/", "/v1/../v1/")
        elif roll < 0.10:
            path = "//" + path.lstrip("/")
        if rng.random() < 0.5:
            pairs = [
                f"{quote(rng.choice(QUERY_KEYS), safe='%[]')}={quote(rng.choice(QUERY_VALUES), safe='%')}"
                for _ in range(rng.randrange(1, 4))
            ]
            path += "?" + "&".join(pairs)
        if rng.random() < 0.8:
            return method, path
        return rng.choice(METHODS), path

    def body(self, path: str) -> tuple[bytes, str | None]:
        rng = self.rng
        roll = rng.random()
        if roll < 0.35:
            return b"", None
        if roll < 0.7 or path.startswith("/v1/tasks"):
            data = json.dumps(task_body(rng) if "tasks" in path else random_json(rng), ensure_ascii=rng.random() < 0.5)
            return data.encode("utf-8", "surrogatepass"), rng.choice(["application/json", "text/plain", None])
        if roll < 0.85:
            return rng.randbytes(rng.randrange(1, 2048)), rng.choice(["application/octet-stream", "application/json"])
        return b"[" * rng.randrange(1, 200_000), "application/json"  # deep nesting

    def next(self, forbid_authorized_shutdown: bool = True) -> Request:
        rng = self.rng
        method, path = self.path()
        auth, authorized = self.authorization()
        if forbid_authorized_shutdown and authorized and "/v1/shutdown" in path:
            auth, authorized = None, False  # the run needs the agent to stay up
        roll = rng.random()
        if roll < 0.01:
            return self.malformed()
        body, content_type = self.body(path) if method not in ("GET", "HEAD") or rng.random() < 0.1 else (b"", None)
        shape = "normal"
        if roll < 0.015:
            body, content_type, shape = rng.randbytes(2 << 20), "application/json", "huge"  # over the 1 MiB limit
        headers = ["Host: 127.0.0.1", f"User-Agent: rawvm-fuzz/{rng.randrange(100)}"]
        if auth is not None:
            headers.append(f"Authorization: {auth}")
        if content_type:
            headers.append(f"Content-Type: {content_type}")
        if rng.random() < 0.2:
            headers.append("Accept: " + rng.choice(["application/json", "*/*", "application/msgpack", "x" * 300]))
        if rng.random() < 0.05:
            headers.append(f"X-{random_text(rng, 6).strip() or 'Z'}: " + "v" * rng.randrange(0, 4000))
        length = len(body)
        if roll < 0.025 and body:
            shape = "truncated"
            length = len(body) + rng.randrange(1, 5000)  # promises more than it sends, then hangs up
        if body or method in ("POST", "PUT", "PATCH"):
            headers.append(f"Content-Length: {length}")
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{h}\r\n" for h in headers) + "\r\n"
        raw = head.encode("utf-8", "surrogatepass") + body
        return Request(raw=raw, authorized=authorized, path=path.split("?")[0], method=method, shape=shape)

    def malformed(self) -> Request:
        rng = self.rng
        raw = rng.choice(
            [
                b"GET\r\n\r\n",
                b"GET / HTTP/9.9\r\n\r\n",
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello to a plain-HTTP port
                b"GET /v1/status HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
                b"POST /v1/tasks HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
                b"POST /v1/tasks HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nabcde",
                b"POST /v1/tasks HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                b"GET /v1/status HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n",
                b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",
                rng.randbytes(rng.randrange(1, 300)),
            ]
        )
        return Request(raw=raw, authorized=False, path="", method="", shape="malformed")


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


class Connection:
    """One keep-alive connection; ``exchange`` sends a request and reads one answer."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 22, ssl=self.tls)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None

    async def exchange(self, raw: bytes, head_request: bool = False, timeout: float = 30.0) -> Response | None:
        """The answer, or None when the server closed the connection without one."""
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        try:
            self.writer.write(raw)
            await self.writer.drain()
            response = await asyncio.wait_for(read_response(self.reader, head_request), timeout)
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            await self.close()
            return None
        if response is None or response.headers.get("connection", "").lower() == "close" or protocol_error(response):
            await self.close()  # aiohttp's parser closes the connection after a request it could not read
        return response


async def read_response(reader: asyncio.StreamReader, head_request: bool = False) -> Response | None:
    line = await reader.readline()
    if not line:
        return None
    parts = line.split(b" ", 2)
    status = int(parts[1])
    headers: dict[str, str] = {}
    while True:
        header = await reader.readline()
        if header in (b"\r\n", b"\n", b""):
            break
        name, _, value = header.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if head_request or status in (204, 304) or 100 <= status < 200:
        return Response(status, headers, b"")
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readline()
                break
            chunks.append(await reader.readexactly(size))
            await reader.readline()
        return Response(status, headers, b"".join(chunks))
    if "content-length" in headers:
        return Response(status, headers, await reader.readexactly(int(headers["content-length"])))
    return Response(status, headers, await reader.read())  # until the server closes


def protocol_error(response: Response) -> bool:
    """A 400 from aiohttp's HTTP parser (not HTTP at all: a bad method, header or length), which answers before
    any middleware sees a request, in plain text. Every answer from the API itself is JSON."""
    return response.status == 400 and response.headers.get("content-type", "").startswith("text/plain")
