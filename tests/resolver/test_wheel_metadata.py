"""A wheel's Requires-Dist read by HTTP range requests, without downloading the wheel: a real HTTP server on
loopback serves a real zip with Range support, as files.pythonhosted.org does."""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from rawvm_resolver.wheel_metadata import remote_wheel_requirements

from tests.helpers.http import serve_in_thread

METADATA = (
    "Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n"
    "Requires-Dist: keras<2.13,>=2.12.0\nRequires-Dist: numpy<1.24,>=1.22\n"
)


class WheelServer(ThreadingHTTPServer):
    def __init__(self, body: bytes, ranges: bool) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.body, self.ranges, self.sent = body, ranges, 0


class _Handler(BaseHTTPRequestHandler):
    server: WheelServer

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()

    def do_GET(self) -> None:
        body, wanted = self.server.body, re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        if wanted and self.server.ranges:
            first, last = int(wanted.group(1)), min(int(wanted.group(2)), len(body) - 1)
            chunk = body[first : last + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {first}-{last}/{len(body)}")
        else:
            chunk = body
            self.send_response(200)
        self.send_header("Content-Length", str(len(chunk)))
        self.end_headers()
        self.wfile.write(chunk)
        self.server.sent += len(chunk)

    def log_message(self, format: str, *args: object) -> None:
        pass


def _wheel(tmp_path: Path) -> bytes:
    path = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("demo/data.bin", os.urandom(2_000_000))  # most of a wheel is code the metadata never needs
        wheel.writestr("demo-1.0.dist-info/METADATA", METADATA)
        wheel.writestr("demo-1.0.dist-info/RECORD", "")
    return path.read_bytes()


def _serve(body: bytes, *, ranges: bool) -> Iterator[WheelServer]:
    return serve_in_thread(WheelServer(body, ranges))


@pytest.fixture
def wheel(tmp_path: Path) -> bytes:
    return _wheel(tmp_path)


def test_requires_dist_comes_from_a_few_ranges(wheel: bytes) -> None:
    for server in _serve(wheel, ranges=True):
        url = f"http://127.0.0.1:{server.server_address[1]}/demo-1.0-py3-none-any.whl"
        assert remote_wheel_requirements(url) == ["keras<2.13,>=2.12.0", "numpy<1.24,>=1.22"]
        assert server.sent < len(wheel) // 10  # the wheel's end and its METADATA, not the whole file


def test_a_server_without_ranges_gives_none(wheel: bytes) -> None:
    for server in _serve(wheel, ranges=False):
        assert remote_wheel_requirements(f"http://127.0.0.1:{server.server_address[1]}/w.whl") is None


def test_an_unreachable_wheel_gives_none() -> None:
    assert remote_wheel_requirements("http://127.0.0.1:9/none.whl") is None
