"""sd_notify against real unix datagram sockets (a path and an abstract-namespace name), as systemd
listens; and the watchdog environment as systemd sets it."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from rawvm_agent import sdnotify


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    # A short directory: unix socket paths are limited to 107 bytes, pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="sdn-") as directory:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(Path(directory) / "notify"))
        sock.settimeout(5)
        yield sock
        sock.close()


def test_notify_sends_one_datagram_to_a_socket_path(listener: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.getsockname())
    assert sdnotify.notify(sdnotify.READY)
    assert sdnotify.notify(sdnotify.status("installing\n  3 of 10 packages"))
    assert listener.recv(4096) == b"READY=1"
    assert listener.recv(4096) == b"STATUS=installing 3 of 10 packages"


def test_notify_reaches_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"rawvm-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify(sdnotify.WATCHDOG)
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_without_systemd_notify_is_a_no_op(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sdnotify.notify(sdnotify.READY)
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert not sdnotify.notify(sdnotify.READY)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert not sdnotify.notify(sdnotify.READY)  # logged, never raised


def test_watchdog_interval_follows_systemd_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    assert sdnotify.watchdog_interval() == 60.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 60.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    for bad in ("0", "-5", "soon", ""):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert sdnotify.watchdog_interval() is None


async def test_feed_watchdog_pings_from_the_event_loop(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.getsockname())
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # 0.1 s: a ping every 0.05 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    listener.setblocking(False)
    feeder = asyncio.create_task(sdnotify.feed_watchdog())
    loop = asyncio.get_running_loop()
    pings = [await asyncio.wait_for(loop.sock_recv(listener, 64), 5) for _ in range(3)]
    feeder.cancel()
    assert pings == [b"WATCHDOG=1"] * 3


async def test_feed_watchdog_returns_without_a_watchdog(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    await asyncio.wait_for(sdnotify.feed_watchdog(), 5)
