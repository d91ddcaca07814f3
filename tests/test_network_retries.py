"""The network steps of the tests retry a transient failure with backoff (tests/helpers/network.py): with DNS
failing for one lookup in ten, they still succeed; a failure that is not the network's fails at once."""

from __future__ import annotations

import errno
import itertools
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from rawvm_resolver import availability
from rawvm_resolver.errors import ResolverError
from rawvm_resolver.index_http import fresh_client

from tests.helpers.http import serve_in_thread
from tests.helpers.network import is_transient, with_retries
from tests.systools import index_reachable, need_index

UV_DNS_FAILURE = (
    "error: Request failed after 3 retries\n  Caused by: error sending request for url (https://pypi.org/simple/six/)\n"
    "  Caused by: dns error: failed to lookup address information: Temporary failure in name resolution\n"
)


class FlakyDns:
    """``socket.getaddrinfo`` failing as a flaky resolver does: one lookup in ``every`` is EAI_AGAIN."""

    def __init__(self, real: Callable[..., Any], every: int = 10) -> None:
        self.real = real
        self.calls = itertools.count(1)
        self.every = every
        self.failed = 0
        self.lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            fail = next(self.calls) % self.every == 0
            self.failed += fail
        if fail:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return self.real(*args, **kwargs)


@pytest.fixture
def flaky_dns(monkeypatch: pytest.MonkeyPatch) -> FlakyDns:
    flaky = FlakyDns(socket.getaddrinfo)
    monkeypatch.setattr(socket, "getaddrinfo", flaky)
    return flaky


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"hello")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    for running in serve_in_thread(ThreadingHTTPServer(("127.0.0.1", 0), _Hello)):
        yield f"http://localhost:{running.server_address[1]}/"  # by name: each request looks localhost up


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
    return body


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"), True),
        (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), True),
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), True),
        (urllib.error.URLError(socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")), True),
        (subprocess.CalledProcessError(2, ["uv", "pip", "compile"], output=b"", stderr=UV_DNS_FAILURE.encode()), True),
        (RuntimeError(f"rawvm: uv failed for linux-x86_64: {UV_DNS_FAILURE}"), True),
        (ResolverError("cannot lock for linux-x86_64: Because pandas==2.2.0 depends on numpy>=1.26"), False),
        (subprocess.CalledProcessError(1, ["uv"], output=b"", stderr=b"error: No solution found"), False),
        (ValueError("a bug"), False),
    ],
)
def test_which_failures_are_transient(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient


def test_a_transient_failure_is_retried_and_others_are_not() -> None:
    waits: list[float] = []
    answers = iter([ConnectionResetError("reset"), socket.gaierror(socket.EAI_AGAIN, "again"), "done"])

    def step() -> str:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert with_retries(step, delays=(1.0, 3.0, 9.0), sleep=waits.append) == "done"
    assert waits == [1.0, 3.0]  # backing off
    with pytest.raises(ValueError, match="a bug"):
        with_retries(lambda: (_ for _ in ()).throw(ValueError("a bug")), sleep=waits.append)
    assert waits == [1.0, 3.0]  # not retried
    with pytest.raises(ConnectionResetError):
        with_retries(lambda: (_ for _ in ()).throw(ConnectionResetError("still")), delays=(0, 0), sleep=waits.append)


def test_with_dns_failing_one_lookup_in_ten_the_retrying_steps_succeed(flaky_dns: FlakyDns, server: str) -> None:
    bare = []
    for _ in range(30):
        try:
            bare.append(fetch(server))
        except urllib.error.URLError as exc:
            assert is_transient(exc)
    assert len(bare) < 30  # without retries, the injected failures fail steps
    before = flaky_dns.failed
    assert [with_retries(lambda: fetch(server), delays=(0.01, 0.05, 0.1)) for _ in range(30)] == [b"hello"] * 30
    assert flaky_dns.failed - before >= 2  # failures were injected, and every step got past them


@pytest.mark.network
def test_against_the_real_index_with_dns_failing_one_lookup_in_ten(flaky_dns: FlakyDns) -> None:
    need_index()
    assert all(index_reachable.__wrapped__() for _ in range(10))  # the guard itself: never a false "offline"
    pages = [with_retries(lambda: fetch("https://pypi.org/simple/six/"), delays=(0.2, 1.0, 3.0)) for _ in range(12)]
    assert all(b"six-1.17.0" in page for page in pages)
    # the resolver's own index lookups (rawvm_resolver.availability) ride out the same resolver
    availability.index_files.cache_clear()
    fresh_client()  # a new process's client: it looks pypi.org up again (once: the pooled client keeps the address)
    names = ["six", "attrs", "idna", "certifi", "packaging", "pyyaml", "click", "rich", "urllib3", "wheel"]
    assert all(availability.index_files(name) for name in names)
    assert flaky_dns.failed >= 2  # one lookup in ten of the ~23 failed, and every step still got its answer
