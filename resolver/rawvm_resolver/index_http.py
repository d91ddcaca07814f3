"""One pooled HTTP client for every index lookup of a lock: kept-alive connections and a cache of resolved addresses.

uv resolves in one process with pooled connections; rawvm's own lookups (the index's JSON pages, PEP 658 metadata,
range reads into wheels) used ``urllib``, which opens a new connection, and asks the resolver for the host's
address anew, on every request. On a network that stalls some DNS lookups for ~5 s (this one; corporate networks
and mirrors behave the same) a lock meets the stall once per request where uv meets it once. Here every host is
looked up once per process (kept ``ADDRESS_TTL_S``, dropped on a failed connect) and every connection is kept alive
in a pool per host, shared by the threads that ask the index in parallel.

Only public urllib3 API: a pool per (scheme, host, port) is opened to the cached address, with the host name for
TLS (SNI and certificate check) and the Host header.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import urllib3
from urllib3.exceptions import HTTPError as TransportError

from rawvm_resolver.errors import ResolverError

__all__ = [
    "ADDRESS_TTL_S",
    "RETRY_DELAYS",
    "IndexClient",
    "IndexResponse",
    "TransportError",
    "client",
    "fresh_client",
]

RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0)  # as uv retries: a DNS hiccup or a reset must not fail a whole lock
ADDRESS_TTL_S = 300.0
_POOL_SIZE = 16  # the lookups run on up to 16 threads (resolve.py, pypi_only.py)


@dataclass(frozen=True)
class IndexResponse:
    status: int
    headers: Mapping[str, str]
    body: bytes


Resolver = Callable[[str, int], list[str]]


def system_addresses(host: str, port: int) -> list[str]:
    """The host's addresses, as the system resolver gives them (IPv4 first: a dead IPv6 route must not stall)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = [str(info[4][0]) for info in infos]
    ordered = sorted(dict.fromkeys(addresses), key=lambda address: ":" in address)
    if not ordered:
        raise OSError(f"no address for {host}")
    return ordered


class IndexClient:
    """Thread-safe GETs and HEADs against package indexes, each host resolved once and its connections pooled."""

    def __init__(self, resolve: Resolver = system_addresses, clock: Callable[[], float] = time.monotonic) -> None:
        self._resolve = resolve
        self._clock = clock
        self._lock = threading.Lock()
        self._addresses: dict[tuple[str, int], tuple[float, list[str]]] = {}
        self._lookup_locks: dict[tuple[str, int], threading.Lock] = {}
        self._pools: dict[tuple[str, str, int, str], urllib3.HTTPConnectionPool] = {}
        self.lookups = 0  # how many times a host was asked of the resolver (the benchmark prints it)
        self.requests = 0

    def request(
        self, method: str, url: str, headers: Mapping[str, str] | None = None, timeout: float = 60
    ) -> IndexResponse:
        """One request, no retries (the caller decides what is transient); TransportError or OSError on failure."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ResolverError(f"{url!r} is not an http(s) URL")
        host = parts.hostname
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = self._address(host, port)
        with self._lock:
            self.requests += 1
        pool = self._pool(parts.scheme, host, port, address)
        target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        wanted = {"Host": parts.netloc.rsplit("@", 1)[-1], "User-Agent": "rawvm-resolver", **(headers or {})}
        try:
            response = pool.request(
                method,
                target,
                headers=wanted,
                timeout=urllib3.Timeout(connect=min(timeout, 15), read=timeout),
                retries=False,
                redirect=False,
                preload_content=True,
            )
        except (TransportError, OSError):
            self._forget(host, port)  # the next try looks the host up again
            raise
        if response.status in (301, 302, 303, 307, 308) and response.headers.get("Location"):
            return self.request(method, urllib.parse.urljoin(url, response.headers["Location"]), headers, timeout)
        return IndexResponse(response.status, response.headers, response.data)  # case-insensitive, as HTTP is

    def get(self, url: str, headers: Mapping[str, str] | None = None, timeout: float = 60) -> IndexResponse:
        return self.request("GET", url, headers, timeout)

    def _address(self, host: str, port: int) -> str:
        """The cached address of the host; the first thread to need it looks it up while the others wait for it
        (sixteen threads starting at once must not make sixteen lookups, each of which may stall)."""
        with self._lock:
            host_lock = self._lookup_locks.setdefault((host, port), threading.Lock())
        with host_lock:
            now = self._clock()
            with self._lock:
                cached = self._addresses.get((host, port))
            if cached is not None and now - cached[0] < ADDRESS_TTL_S:
                return cached[1][0]
            addresses = self._resolve(host, port)  # under the host's lock only: other hosts go on
            with self._lock:
                self.lookups += 1
                self._addresses[(host, port)] = (now, addresses)
            return addresses[0]

    def _forget(self, host: str, port: int) -> None:
        with self._lock:
            self._addresses.pop((host, port), None)

    def _pool(self, scheme: str, host: str, port: int, address: str) -> urllib3.HTTPConnectionPool:
        key = (scheme, host, port, address)
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                if scheme == "https":
                    pool = urllib3.HTTPSConnectionPool(
                        address, port, maxsize=_POOL_SIZE, server_hostname=host, assert_hostname=host
                    )
                else:
                    pool = urllib3.HTTPConnectionPool(address, port, maxsize=_POOL_SIZE)
                self._pools[key] = pool
            return pool


_CLIENT: IndexClient | None = None
_CLIENT_LOCK = threading.Lock()


def fresh_client() -> IndexClient:
    """Start over with a new client, as a new process would (the benchmark times each lock as a user's first)."""
    global _CLIENT
    with _CLIENT_LOCK:
        _CLIENT = IndexClient()
        return _CLIENT


def client() -> IndexClient:
    """The process's one index client (every lookup of every lock in this process shares its pools)."""
    global _CLIENT
    with _CLIENT_LOCK:
        if _CLIENT is None:
            _CLIENT = IndexClient()
        return _CLIENT
