"""Staging for machines on this host (qemu guests): a small HTTP server on loopback.

``GET /<capability>/files/<name>`` serves what was staged; ``PUT /<capability>/sink/<name>`` stores what agents
upload when they stop. The capability is a random secret per server (192 bits) that only the URLs handed to
the cluster's machines carry: loopback is shared by every local user, and every qemu guest reaches it as
10.0.2.2 (hence the configurable URL host), so without it anyone could read the staged code and keys or
forge flushes. A PUT is accepted only for the names the owner expects (one per machine it launched);
a batch machine flushes its results more than once, so an expected name may be replaced. Every refusal is a
bare 403 or 404: no body says what was wrong. Names are relative paths of plain components (letters,
digits, ``._+-``); anything else, ``..`` included, is refused, so neither side can reach outside its directory.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable, Collection, Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import quote, unquote, urlsplit

from rawvm.errors import RawvmError
from rawvm.files import place_file

log = logging.getLogger(__name__)

QEMU_HOST = "10.0.2.2"  # the host's loopback as seen from a qemu user-networking guest
_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_CHUNK = 1 << 16
CAPABILITY_BYTES = 24  # 192 bits, url-safe base64 in the path


def new_capability() -> str:
    return secrets.token_urlsafe(CAPABILITY_BYTES)


def safe_relpath(name: str) -> str:
    """``name`` as a relative POSIX path of plain components, or ValueError (``..``, absolute, odd chars)."""
    parts = name.split("/")
    if not name or any(not _COMPONENT.fullmatch(p) or p in {".", ".."} for p in parts):
        raise ValueError(f"unsafe staged name {name!r}: use relative paths of letters, digits and ._+-")
    return "/".join(parts)


def _inside(root: Path, rel: str) -> Path:
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()):  # a symlink pointing out
        raise ValueError(f"{rel!r} leaves {root}")
    return path


class LoopbackStager:
    """Serves ``root`` (files) and receives uploads into ``sink_dir`` on ``bind``:``port`` (0: a free port).

    Every URL is under ``/<capability>/`` (a new random one unless given). ``expected_uploads`` says which
    sink names may be PUT right now (asked on each PUT, so machines launched later count); none by default.
    Use as a context manager or call ``start``/``close``. Directories it created itself are removed on close.
    """

    def __init__(
        self,
        root: Path | None = None,
        *,
        sink_dir: Path | None = None,
        url_host: str = "127.0.0.1",
        bind: str = "127.0.0.1",
        port: int = 0,
        max_upload_bytes: int = 4 << 30,
        capability: str = "",
        expected_uploads: Callable[[], Collection[str]] = frozenset,
    ) -> None:
        self.capability = capability or new_capability()
        self.expected_uploads = expected_uploads
        self._owned: list[Path] = []
        self.root = root if root is not None else self._temp_dir("rawvm-stage-")
        self.sink_dir = sink_dir if sink_dir is not None else self._temp_dir("rawvm-sink-")
        self.root.mkdir(parents=True, exist_ok=True)
        self.sink_dir.mkdir(parents=True, exist_ok=True)
        self.url_host = url_host
        self.max_upload_bytes = max_upload_bytes
        self._bind, self._port = bind, port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def _temp_dir(self, prefix: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=prefix))
        self._owned.append(path)
        return path

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the stager is not started")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://{self.url_host}:{self.port}/{self.capability}"

    def start(self) -> LoopbackStager:
        if self._server is not None:
            return self
        handler = type("_BoundHandler", (_Handler,), {"stager": self})
        try:
            self._server = ThreadingHTTPServer((self._bind, self._port), handler)
        except OSError as exc:
            raise RawvmError(f"cannot serve staged files on {self._bind}:{self._port}: {exc.strerror}") from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.1,), name="rawvm-stager", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for path in self._owned:
            shutil.rmtree(path, ignore_errors=True)
        self._owned.clear()

    def __enter__(self) -> LoopbackStager:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def stage(self, files: Iterable[tuple[str, Path]]) -> dict[str, str]:
        """Copy each ``(name, path)`` under ``root`` (a hard link when possible); returns name -> URL."""
        urls: dict[str, str] = {}
        for name, source in files:
            rel = safe_relpath(name)
            place_file(source, self.root / rel)
            urls[name] = self.url(rel)
        return urls

    def url(self, name: str) -> str:
        return f"{self.base_url}/files/{quote(safe_relpath(name))}"

    def sink_url(self, prefix: str = "") -> str:
        """PUT target for agents; ``prefix`` (e.g. the cluster) keeps uploads of different clusters apart."""
        return f"{self.base_url}/sink/" + (quote(safe_relpath(prefix)) + "/" if prefix else "")


class _Handler(BaseHTTPRequestHandler):
    stager: LoopbackStager
    server_version = "rawvm-stager"
    sys_version = ""

    def log_message(self, format: str, *args: object) -> None:
        log.debug("stager: " + format, *args)

    def _route(self, kind: str) -> str | None:
        """The safe relative name after ``/<capability>/<kind>/``, or None (wrong capability, odd name)."""
        capability, _, rest = urlsplit(self.path).path.removeprefix("/").partition("/")
        if not hmac.compare_digest(capability.encode(), self.stager.capability.encode()):
            return None
        rest = unquote(rest)
        if not rest.startswith(f"{kind}/"):
            return None
        try:
            return safe_relpath(rest[len(kind) + 1 :])
        except ValueError:
            return None

    def _reply(self, status: HTTPStatus) -> None:
        """A bare answer: a refusal does not say which check failed."""
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        rel = self._route("files")
        try:
            path = _inside(self.stager.root, rel) if rel else None
        except ValueError:
            path = None
        if path is None or not path.is_file():
            self._reply(HTTPStatus.NOT_FOUND)
            return
        with path.open("rb") as f:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(os.fstat(f.fileno()).st_size))
            self.end_headers()
            if self.command != "HEAD":
                shutil.copyfileobj(f, self.wfile, _CHUNK)

    def do_PUT(self) -> None:
        rel = self._route("sink")
        if rel is None or rel not in self.stager.expected_uploads():
            self.close_connection = True  # the body is not read
            self._reply(HTTPStatus.FORBIDDEN)
            return
        length_header = self.headers.get("Content-Length", "")
        if not re.fullmatch(r"[0-9]{1,19}", length_header):
            self.close_connection = True
            self._reply(HTTPStatus.LENGTH_REQUIRED)
            return
        length = int(length_header)
        if length > self.stager.max_upload_bytes:
            self.close_connection = True
            self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            return
        sink = self.stager.sink_dir
        try:
            target = _inside(sink, rel)
        except ValueError:
            self.close_connection = True
            self._reply(HTTPStatus.FORBIDDEN)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as out:
                remaining = length
                while remaining:
                    chunk = self.rfile.read(min(_CHUNK, remaining))
                    if not chunk:
                        raise ConnectionError("upload ended early")
                    out.write(chunk)
                    remaining -= len(chunk)
            os.replace(tmp, target)
        except (OSError, ConnectionError):
            Path(tmp).unlink(missing_ok=True)
            self.close_connection = True
            return
        self._reply(HTTPStatus.CREATED)
