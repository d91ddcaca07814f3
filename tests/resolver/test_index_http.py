"""The resolver's index lookups share one pooled client: a host is looked up once, connections are kept alive.

A real HTTP/1.1 server on loopback plays the index and counts the TCP connections it accepts; the system resolver is
the boundary, replaced by a counting one (and, for the stall, a slow one) that answers 127.0.0.1.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import ThreadingHTTPServer

import pytest
from rawvm_resolver import availability, index_http
from rawvm_resolver.index_http import IndexClient, TransportError

from tests.helpers.http import QuietHandler, serve_in_thread
from tests.systools import need_index

PAGE = json.dumps({"files": [{"filename": "demo-1.0-py3-none-any.whl", "url": "demo-1.0-py3-none-any.whl"}]})


class CountingIndex(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.connections = 0
        self.requests = 0
        self.lock = threading.Lock()

    def get_request(self):  # type: ignore[no-untyped-def]
        accepted = super().get_request()
        with self.lock:
            self.connections += 1
        return accepted


class _Handler(QuietHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real indexes do
    server: CountingIndex

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.requests += 1
        if self.path.startswith("/simple/missing/"):
            self._reply(404, b"")
        else:
            self._reply(200, PAGE.encode())


@pytest.fixture
def index() -> Iterator[CountingIndex]:
    yield from serve_in_thread(CountingIndex())


class CountingResolver:
    def __init__(self, stall_s: float = 0.0) -> None:
        self.calls = 0
        self.stall_s = stall_s

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls += 1
        time.sleep(self.stall_s)
        return ["127.0.0.1"]


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> CountingResolver:
    counting = CountingResolver(stall_s=0.3)  # a stalling DNS: paid once, not once a request
    monkeypatch.setattr(index_http, "_CLIENT", IndexClient(resolve=counting))
    availability.index_files.cache_clear()
    return counting


def test_many_parallel_lookups_share_one_name_lookup_and_a_few_connections(
    index: CountingIndex, resolver: CountingResolver
) -> None:
    base = f"http://index.test:{index.server_address[1]}/simple"
    names = [f"pkg{i}" for i in range(64)]
    with ThreadPoolExecutor(16) as pool:
        listings = list(pool.map(lambda name: availability.index_files(name, base), names))
    assert all(listing[0].filename == "demo-1.0-py3-none-any.whl" for listing in listings)
    assert listings[0][0].url == f"{base}/pkg0/demo-1.0-py3-none-any.whl"
    assert index.requests == 64
    assert index.connections <= 16  # kept alive: urllib opened 64
    assert resolver.calls == 1  # the other threads waited for the first lookup instead of stalling on their own
    again = [availability.index_files(f"other{i}", base) for i in range(32)]
    assert len(again) == 32 and resolver.calls == 1 and index.connections <= 16


def test_an_unknown_name_is_asked_once(index: CountingIndex, resolver: CountingResolver) -> None:
    base = f"http://index.test:{index.server_address[1]}/simple"
    assert availability.index_files("missing", base) == ()
    assert availability.index_files("missing", base) == ()
    assert index.requests == 1


def test_a_failed_connect_looks_the_host_up_again(index: CountingIndex) -> None:
    answers = [["127.0.0.2"], ["127.0.0.1"]]  # the first address is stale: nothing listens there
    calls: list[str] = []

    def resolve(host: str, _port: int) -> list[str]:
        calls.append(host)
        return answers.pop(0)

    client = IndexClient(resolve=resolve)
    url = f"http://index.test:{index.server_address[1]}/simple/a/"
    with pytest.raises(TransportError):
        client.get(url)
    assert client.get(url).status == 200
    answer = client.get(url)
    assert answer.headers["Content-Length"] == answer.headers["content-length"] == str(len(PAGE))  # any case
    assert calls == ["index.test", "index.test"]


def test_real_pypi_over_tls_with_sni_on_the_cached_address() -> None:
    need_index()
    client = IndexClient()
    response = client.get("https://pypi.org/simple/six/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    assert response.status == 200 and b"six-1.17.0" in response.body
    assert client.get("https://pypi.org/simple/rawvm-no-such-package-xyz/").status == 404
    assert client.lookups == 1
