"""The index is asked again after a transient failure (a 5xx, a reset), as uv itself retries, and a 4xx or a
lasting outage is one clear line. A real HTTP server on loopback plays the index."""

from __future__ import annotations

import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from rawvm_resolver import availability
from rawvm_resolver.errors import ResolverError

from tests.helpers.http import serve_in_thread

PAGE = {"files": [{"filename": "demo-1.0-py3-none-any.whl"}, {"filename": "demo-0.9.tar.gz", "yanked": True}]}


class FlakyIndex(ThreadingHTTPServer):
    def __init__(self, failures: list[int]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.failures = failures  # status codes to answer first (0: drop the connection), then the page
        self.requests = 0


class _Handler(BaseHTTPRequestHandler):
    server: FlakyIndex

    def do_GET(self) -> None:
        self.server.requests += 1
        if self.server.failures:
            status = self.server.failures.pop(0)
            if status == 0:
                self.connection.close()  # the client sees the connection reset mid-request
                return
            self.send_error(status)
            return
        body = json.dumps(PAGE).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.pypi.simple.v1+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(availability, "RETRY_DELAYS", (0.01, 0.01, 0.01))
    availability.index_files.cache_clear()


def _serve(failures: list[int]) -> Iterator[FlakyIndex]:
    return serve_in_thread(FlakyIndex(failures))


def _url(server: FlakyIndex) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/simple"


def test_transient_failures_are_retried() -> None:
    for server in _serve([503, 0, 502]):
        files = availability.index_files("demo", _url(server))
        assert [file.filename for file in files] == ["demo-1.0-py3-none-any.whl"]  # the yanked sdist is left out
        assert server.requests == 4


def test_a_lasting_outage_is_one_line_after_the_retries() -> None:
    for server in _serve([503] * 10):
        with pytest.raises(ResolverError, match=r"cannot ask http://127\.0\.0\.1:\d+/simple about demo: HTTP 503"):
            availability.index_files("demo", _url(server))
        assert server.requests == 4  # the first try and three retries


def test_a_client_error_is_not_retried_and_404_means_unknown() -> None:
    for server in _serve([403]):
        with pytest.raises(ResolverError, match="HTTP 403"):
            availability.index_files("demo", _url(server))
        assert server.requests == 1
    for server in _serve([404]):
        assert availability.index_files("gone", _url(server)) == ()
