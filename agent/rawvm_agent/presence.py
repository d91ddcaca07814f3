"""People on the machine: open shells, forwarded connections, file copies and notebook syncs, as the idle policy
hears them.

A person at a shell may type nothing for minutes and load no CPU, yet the machine must not power off under them.
So every such session holds a place here while its websocket is open, and ``busy`` tells the idle policy (through
``task_running``, as the call queue does). A session that ended since the policy's last look still counts once,
so a short copy between two looks is witnessed; after that the idle clock starts. A laptop that vanishes ends its
session when the websocket's heartbeat goes unanswered, so it counts as closed.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator

KINDS = ("shell", "forward", "files", "sync")


class Presence:
    """How many sessions of each kind are open; ``on_change`` runs when one opens or closes (the agent re-checks
    idleness at once rather than a sample later)."""

    def __init__(self, on_change: Callable[[], None] = lambda: None) -> None:
        self._open: Counter[str] = Counter()
        self._touched = False  # a session opened or closed since the last ``busy``
        self._on_change = on_change

    @contextlib.contextmanager
    def hold(self, kind: str) -> Iterator[None]:
        """Count one session of ``kind`` while the block runs (however it ends)."""
        self._open[kind] += 1
        self._touched = True
        self._on_change()
        try:
            yield
        finally:
            self._open[kind] -= 1
            self._touched = True
            self._on_change()

    def busy(self) -> bool:
        """A session is open, or one opened or closed since the previous call: activity for the idle policy."""
        touched, self._touched = self._touched, False
        return touched or any(self._open.values())

    def counts(self) -> dict[str, int]:
        """Open sessions by kind, for ``GET /v1/status``."""
        return {kind: self._open[kind] for kind in KINDS}
