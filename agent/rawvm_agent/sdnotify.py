"""sd_notify(3) over ``$NOTIFY_SOCKET``: readiness, status and the watchdog ping that keeps systemd from
restarting a healthy agent.

Standard library only. The PyPI options are either unmaintained (``sdnotify``, last release 2017) or
C extensions that need libsystemd headers on every VM (``systemd-python``, ``cysystemd``); the protocol
is one datagram on a unix socket.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

log = logging.getLogger(__name__)

READY = "READY=1"
STOPPING = "STOPPING=1"
WATCHDOG = "WATCHDOG=1"


def status(text: str) -> str:
    """A ``STATUS=`` line for ``systemctl status`` (one line: newlines would start new assignments)."""
    return "STATUS=" + " ".join(text.split())


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to systemd. False, and nothing sent, when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    elif not address.startswith("/"):  # unset, or a vsock: address we do not speak
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify to %r failed: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds systemd expects pings within, or None when there is no watchdog
    (or it is meant for another process: ``$WATCHDOG_PID`` set and not ours)."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if usec <= 0 or (pid is not None and pid.strip() != str(os.getpid())):
        return None
    return usec / 1_000_000


async def feed_watchdog() -> None:
    """Ping the watchdog at half its timeout, forever; returns at once when there is no watchdog.

    Run it as a task on the agent's event loop: when the loop hangs, the pings stop and systemd restarts
    the agent (``WatchdogSec=`` in rawvm-agent.service).
    """
    interval = watchdog_interval()
    if interval is None:
        return
    while True:
        notify(WATCHDOG)
        await asyncio.sleep(interval / 2)
