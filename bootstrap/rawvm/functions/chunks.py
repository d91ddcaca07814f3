"""``f.map``'s calls, many to a payload, sized as they run.

One call per payload costs a pickle, a frame, a future and a share of an HTTP exchange on each of the client,
the agent and the worker: for tiny calls that overhead is everything. A map therefore sends *chunks*:
``(CHUNK, pickled function, [item, ...])``, which the worker runs one item after another
(``call_worker.run_chunk``), answering with every result in order, each failed call's error by its index, and
the seconds the calls took there.

How many calls go in a chunk is decided as the map runs, by ``ChunkSizer``, from what the chunks so far showed:
the time per call (measured by the worker) and the round trip beyond it (the client's wall time for a chunk less
the worker's time; the least seen recently, as queueing behind other chunks inflates the rest). A chunk's calls
should take ``AMORTIZE`` round trips, so message costs stay a small part; and what is left is split over at
least ``SPREAD`` chunks per worker (guided self-scheduling), so every worker has work and the tail stays short.
Before anything is known, single calls go out as probes: a long call never waits behind others in a chunk; if
none has come back after ``PROBE_WAIT_S`` the calls are not tiny, and chunks stay small. The sizer belongs to
the function, so a later map starts from what the last one learnt.

Results reach the caller in input order, each call's error its own; a chunk that fails as a whole (its worker
died, the function did not unpickle) fails each of its calls with that error.
"""

from __future__ import annotations

import asyncio
import collections
import math
import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rawvm_agent.call_worker import CHUNK

from rawvm.errors import UsageError
from rawvm.functions.pool import MAX_CALL_BYTES, Pool
from rawvm.functions.results import decode_result

__all__ = ["ChunkSizer", "MapOptions", "encode_chunk", "run_map"]

MAX_CHUNK_BYTES = 8 << 20  # a chunk of many calls stays well under that
MAX_CHUNK_CALLS = 100_000
AMORTIZE = 8.0  # a chunk's calls take this many round trips of time: the message costs stay ~1/8 or less
SPREAD = 2  # what is left goes out in at least this many chunks per worker
IN_FLIGHT_PER_WORKER = 2  # chunks sent and not back, per worker: one running, one waiting on the machine
DEFAULT_WORKERS = 4  # before any machine has said how many call workers it runs
DEFAULT_LATENCY_S = 0.005  # a round trip, before one is measured
PROBE_WAIT_S = 0.05  # no probe back by then: the calls are not tiny
LATENCY_DRIFT = 1.25  # the least round trip seen may rise this much per chunk (the network got slower)


@dataclass
class ChunkSizer:
    """What the chunks of a function have shown so far: seconds per call and per round trip."""

    per_call_s: float | None = None
    latency_s: float | None = None
    item_bytes: float = 0.0

    def observe(self, calls: int, compute_s: float, wall_s: float) -> None:
        """A chunk of ``calls`` came back after ``wall_s``; the worker spent ``compute_s`` on its calls."""
        each = compute_s / max(calls, 1)
        self.per_call_s = each if self.per_call_s is None else 0.7 * self.per_call_s + 0.3 * each
        overhead = max(wall_s - compute_s, 0.0)
        self.latency_s = overhead if self.latency_s is None else min(overhead, self.latency_s * LATENCY_DRIFT)

    def not_tiny(self) -> None:
        """No probe came back within PROBE_WAIT_S: a call takes at least that long."""
        if self.per_call_s is None:
            self.per_call_s = PROBE_WAIT_S

    def size(self, remaining: int, workers: int) -> int:
        """Calls for the next chunk, with ``remaining`` calls not sent yet over ``workers`` workers."""
        if self.per_call_s is None:
            return 1  # a probe
        latency = DEFAULT_LATENCY_S if self.latency_s is None else self.latency_s
        amortize = math.ceil(AMORTIZE * latency / max(self.per_call_s, 1e-7))
        balance = math.ceil(remaining / (SPREAD * max(workers, 1)))
        # Never below a quarter of the amortizing size: a long tail of small chunks costs more than it spreads.
        wanted = min(amortize, max(balance, math.ceil(amortize / 4)))
        if self.item_bytes:
            wanted = min(wanted, int(MAX_CHUNK_BYTES / self.item_bytes))
        return max(1, min(wanted, remaining, MAX_CHUNK_CALLS))


def encode_chunk(blob: bytes, items: Sequence[Any], dumps: Callable[[Any], bytes], plain: bool) -> bytes:
    """A chunk's payload: the C pickler when every item is a builtin scalar or small container of them."""
    chunk = (CHUNK, blob, list(items))
    return pickle.dumps(chunk, protocol=5) if plain else dumps(chunk)


@dataclass
class _Sent:
    start: int
    calls: int
    sent_at: float
    future: asyncio.Future[Any]


class _Map:
    """One map on the pool's loop: chunks formed as room frees, results kept in input order."""

    def __init__(self, pool: Pool, blob: bytes, items: Sequence[Any], options: MapOptions) -> None:
        self.pool, self.blob, self.items, self.options = pool, blob, items, options
        self.sizer = options.sizer
        self.next = 0  # the first item not sent yet
        self.sent: collections.deque[_Sent] = collections.deque()  # input order; the head leaves as it completes
        self.flying: set[asyncio.Future[Any]] = set()  # sent and not back
        self.outcomes: list[tuple[bool, Any]] = []

    def _workers(self) -> int:
        return self.pool.workers() or DEFAULT_WORKERS

    def _encode(self, start: int, calls: int) -> tuple[int, bytes]:
        """The payload of ``calls`` items from ``start``, halved until it fits; (calls, payload)."""
        while True:
            items = self.items[start : start + calls]
            plain = all(self.options.plain(item) for item in items)
            payload = encode_chunk(self.blob, items, self.options.dumps, plain)
            if calls > 1 and len(payload) > MAX_CHUNK_BYTES:
                calls //= 2
                continue
            if len(payload) > MAX_CALL_BYTES:
                raise UsageError(
                    f"a call to {self.options.name} pickles to {len(payload) >> 20} MiB, over the "
                    f"{MAX_CALL_BYTES >> 20} MiB limit: pass big data as a file or URL instead"
                )
            self.sizer.item_bytes = len(payload) / calls
            return calls, payload

    async def _fill(self) -> None:
        out = len(self.flying)
        room = IN_FLIGHT_PER_WORKER * self._workers() - out
        if self.sizer.per_call_s is None:
            room = min(room, self._workers() - out)  # probes: one per worker at most
        batch: list[tuple[int, int, bytes]] = []
        while room > 0 and self.next < len(self.items):
            calls, payload = self._encode(self.next, self.sizer.size(len(self.items) - self.next, self._workers()))
            batch.append((self.next, calls, payload))
            self.next += calls
            room -= 1
        if not batch:
            return
        now = time.monotonic()
        futures = await self.pool.run([payload for _, _, payload in batch], self.options.loads)
        for (start, calls, _), future in zip(batch, futures, strict=True):
            sent = _Sent(start, calls, now, future)
            future.add_done_callback(lambda f, s=sent: self._came_back(s, f))  # type: ignore[misc]
            self.sent.append(sent)
            self.flying.add(future)

    def _came_back(self, sent: _Sent, future: asyncio.Future[Any]) -> None:
        self.flying.discard(future)
        if not future.cancelled() and future.exception() is None:
            compute_s = future.result()[0]
            self.sizer.observe(sent.calls, compute_s, time.monotonic() - sent.sent_at)
        if self.options.advance is not None:
            self.options.advance(sent.calls)

    def _take_done(self) -> bool:
        """Move the completed head chunks' results to ``outcomes``; True when the map stops at an error."""
        while self.sent and self.sent[0].future.done():
            head = self.sent.popleft()
            for ok, value in self._outcomes(head):
                self.outcomes.append((ok, value))
                if not ok and self.options.stop_on_error:
                    return True
        return False

    def _outcomes(self, sent: _Sent) -> list[tuple[bool, Any]]:
        try:
            _, values, errors = sent.future.result()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the whole chunk failed: so did each of its calls
            return [(False, exc)] * sent.calls
        outcomes: list[tuple[bool, Any]] = [(True, value) for value in values]
        for index, payload in errors:
            try:
                outcomes[index] = decode_result(self.options.loads, 1, payload)
            except Exception as exc:  # an error that does not unpickle here
                outcomes[index] = (False, exc)
        return outcomes

    async def run(self) -> list[tuple[bool, Any]]:
        try:
            while self.next < len(self.items) or self.sent:
                await self._fill()
                pending = set(self.flying)
                if pending:
                    probing = self.sizer.per_call_s is None
                    done, _ = await asyncio.wait(
                        pending, timeout=PROBE_WAIT_S if probing else None, return_when=asyncio.FIRST_COMPLETED
                    )
                    if not done:
                        self.sizer.not_tiny()
                if self._take_done():
                    break
        finally:
            if self.sent or self.next < len(self.items):  # stopped early (an error, or cancelled): send no more
                self.pool.drop_unsent()
                for sent in self.sent:
                    sent.future.cancel()
        return self.outcomes


@dataclass(frozen=True)
class MapOptions:
    """How a map's items and results travel, and what it does on an error."""

    sizer: ChunkSizer
    dumps: Callable[[Any], bytes]
    loads: Callable[[bytes], Any]
    plain: Callable[[Any], bool]  # an item the C pickler can take
    stop_on_error: bool
    name: str = "the function"
    advance: Callable[[int], None] | None = None  # this many calls ended (a progress bar)


async def run_map(pool: Pool, blob: bytes, items: Sequence[Any], options: MapOptions) -> list[tuple[bool, Any]]:
    """``(True, result)`` or ``(False, exception)`` per item, in input order; with ``stop_on_error`` the list
    ends at the first failure in input order, and what is not sent by then is not."""
    return await _Map(pool, blob, items, options).run()
