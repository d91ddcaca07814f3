"""Download one file of a bundle or batch (http(s) with retries, file://, or a plain path), hashing as it goes.

The caller checks the sha256 this returns; a failure is an InstallError whose message never shows a presigned
URL's query string (it carries credentials).
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

import aiohttp

from rawvm_agent.config import InstallConfig
from rawvm_agent.install import InstallError

CHUNK = 1 << 16
FETCH_ATTEMPTS = 3


def ssl_context(config: InstallConfig) -> ssl.SSLContext | bool:
    """The system's trusted roots plus ``[install] ca_certs`` (a private index or mirror behind its own CA), for
    ``aiohttp.TCPConnector(ssl=...)``. ``True`` without extra CAs: aiohttp's own verifying context, the same system
    roots, made at its import, since loading the system store again costs ~40 ms here, ~0.7 s on a small VM."""
    if not config.ca_certs:
        return True
    ctx = ssl.create_default_context()
    for pem in config.ca_certs:
        ctx.load_verify_locations(cafile=pem)
    return ctx


async def fetch(
    session: aiohttp.ClientSession,
    url: str,
    dest: Path,
    on_bytes: Callable[[int], None],
    on_size: Callable[[int], None] = lambda n: None,
) -> str:
    """Copy ``url`` (http(s)://, file:// or an absolute path) to ``dest``; return its sha256.

    ``on_bytes(n)`` reports progress (negative after a failed attempt, to take its bytes back);
    ``on_size(n)`` the size when it is known up front.
    """
    scheme = urlsplit(url).scheme
    if scheme in ("http", "https"):
        for attempt in range(1, FETCH_ATTEMPTS + 1):
            counter = _Counter(on_bytes)
            try:
                return await _fetch_http(session, url, dest, counter, on_size if attempt == 1 else lambda n: None)
            except (aiohttp.ClientError, TimeoutError) as exc:
                on_bytes(-counter.total)
                client_error = isinstance(exc, aiohttp.ClientResponseError) and exc.status < 500
                if attempt == FETCH_ATTEMPTS or client_error:  # a 403 or 404 will not mend itself
                    raise InstallError(f"cannot download {_without_query(url)}: {_describe(exc, url)}") from None
                await asyncio.sleep(attempt)
    if scheme in ("file", ""):
        source = Path(url2pathname(urlsplit(url).path)) if scheme == "file" else Path(url)
        try:
            on_size(source.stat().st_size)
            return await asyncio.to_thread(_copy_file, source, dest, on_bytes)
        except OSError as exc:  # reading the source, or writing the copy (a full disk)
            raise InstallError(f"cannot copy bundle file {source} to {dest.parent}: {exc.strerror}") from None
    raise InstallError(f"unsupported bundle URL scheme {scheme!r} (use http, https or file)")


def _without_query(url: str) -> str:
    # Presigned URLs carry credentials in the query string; never log them.
    return url.split("?", 1)[0]


def _describe(exc: BaseException, url: str) -> str:
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"HTTP {exc.status} {exc.message}"
    return (str(exc) or type(exc).__name__).replace(url, _without_query(url))


class _Counter:
    """Passes byte counts on and remembers their sum, so a failed attempt's bytes can be taken back."""

    def __init__(self, on_bytes: Callable[[int], None]) -> None:
        self.on_bytes = on_bytes
        self.total = 0

    def __call__(self, n: int) -> None:
        self.total += n
        self.on_bytes(n)


async def _fetch_http(
    session: aiohttp.ClientSession,
    url: str,
    dest: Path,
    on_bytes: Callable[[int], None],
    on_size: Callable[[int], None],
) -> str:
    digest = hashlib.sha256()
    async with session.get(url, raise_for_status=True) as resp:
        if resp.content_length is not None:
            on_size(resp.content_length)
        with dest.open("wb") as fh:
            async for chunk in resp.content.iter_chunked(CHUNK):
                fh.write(chunk)
                digest.update(chunk)
                on_bytes(len(chunk))
    return digest.hexdigest()


def _copy_file(source: Path, dest: Path, on_bytes: Callable[[int], None]) -> str:
    digest = hashlib.sha256()
    with source.open("rb") as src, dest.open("wb") as out:
        while chunk := src.read(CHUNK):
            out.write(chunk)
            digest.update(chunk)
            on_bytes(len(chunk))
    return digest.hexdigest()
