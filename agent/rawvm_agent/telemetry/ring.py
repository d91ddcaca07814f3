"""The in-memory ring: the last N samples as compressed msgpack frames, plus the few numbers idle checks need.

Frames stay packed and zlib-compressed (about 0.6 KB a sample here, 1.3 KB with 8 GPUs, instead of a tree of
Python objects), so an hour at 1 Hz costs a few MB; compressing costs ~25 µs a tick. They are expanded only
when read. Not thread-safe on its own: the sampler holds a lock around it.
"""

from __future__ import annotations

import zlib
from bisect import bisect_right
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Summary:
    """Per-sample figures the idle logic reads every tick, kept unpacked."""

    t: float
    cpu_percent: float | None  # None: the cpu collector failed in that sample
    gpu_percent: tuple[float | None, ...]  # per GPU; None where utilization was not reported


class Ring:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("ring capacity must be at least 1")
        self.capacity = capacity
        self._seqs: deque[int] = deque(maxlen=capacity)
        self._frames: deque[bytes] = deque(maxlen=capacity)
        self._summaries: deque[Summary] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def last_seq(self) -> int:
        return self._seqs[-1] if self._seqs else 0

    def append(self, seq: int, frame: bytes, summary: Summary) -> None:
        if self._seqs and seq <= self._seqs[-1]:
            raise ValueError(f"sample seq {seq} does not follow {self._seqs[-1]}")
        self._seqs.append(seq)
        self._frames.append(zlib.compress(frame, 1))
        self._summaries.append(summary)

    def _range(self, seq: int, limit: int, newest: bool = False) -> range:
        start = bisect_right(self._seqs, seq)
        if newest:  # the last ``limit`` of them: a viewer that starts late wants now, not an hour ago
            start = max(start, len(self._frames) - max(0, limit))
        return range(start, min(len(self._frames), start + max(0, limit)))

    def frames_after(self, seq: int, limit: int, newest: bool = False) -> list[bytes]:
        """Up to ``limit`` frames with a seq greater than ``seq``, oldest first (the newest ones with ``newest``)."""
        return [zlib.decompress(self._frames[i]) for i in self._range(seq, limit, newest)]

    def compressed_after(self, seq: int, limit: int, newest: bool = False) -> list[bytes]:
        """The same frames still compressed: cheap to take under a lock, expanded afterwards."""
        return [self._frames[i] for i in self._range(seq, limit, newest)]

    def summaries_since(self, t: float) -> list[Summary]:
        """Summaries of samples taken at or after ``t`` (newest last)."""
        out: list[Summary] = []
        for summary in reversed(self._summaries):
            if summary.t < t:
                break
            out.append(summary)
        out.reverse()
        return out

    def last_summary(self) -> Summary | None:
        return self._summaries[-1] if self._summaries else None
