"""A batch machine's final results on its disk: one JSON line each, appended to segment files.

``state_dir/batch/results/<segment>.jsonl``: results are appended to the open segment, and each incremental
flush closes it (the next result opens a new one). So a directory sink, which keeps every flush, is handed
each segment once and never a file that changes later, and no result costs a file of its own: creating a
file was most of a tiny task's cost on the agent (two per result, with the sink's copy; issue 22). A line is
written with one ``write`` and no fsync: an agent that crashes keeps every line it wrote; a power cut may
tear the last one, which readers skip (that task then runs again, as a running one does).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["ResultLog", "read_results", "read_segment"]

SUFFIX = ".jsonl"


def read_segment(path: Path) -> Iterator[dict[str, Any]]:
    """The results of one segment, in the order they were written; a torn or foreign line is skipped."""
    with contextlib.suppress(OSError), path.open("rb") as fh:
        for line in fh:
            with contextlib.suppress(ValueError):
                result = json.loads(line)
                if isinstance(result, dict) and isinstance(result.get("id"), int):
                    yield result


def read_results(directory: Path) -> Iterator[dict[str, Any]]:
    """Every result in a results directory (a machine's, or a copy flushed to a sink): its segments' lines in
    segment order, then the ``<id>.json`` files of agents from before segments (one file per result)."""
    for segment in sorted(directory.glob(f"*{SUFFIX}")):
        yield from read_segment(segment)
    for path in sorted(directory.glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            result = json.loads(path.read_bytes())
            if isinstance(result, dict) and isinstance(result.get("id"), int):
                yield result


class ResultLog:
    """The segments under ``directory``: ``load`` what an earlier run wrote, ``append``, and ``close_segment``
    at each flush."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.segments: list[Path] = []  # every segment, oldest first (the open one last, once it has a line)
        self._open: IO[bytes] | None = None
        self._next = 0  # the number of the next segment to open

    def load(self) -> list[dict[str, Any]]:
        """Every result an earlier run of the agent wrote, oldest first. New ones go to a new segment: the last
        old one may end in a torn line."""
        self.segments = sorted(self.dir.glob(f"*{SUFFIX}"))
        numbers = [int(p.stem) for p in self.segments if p.stem.isdigit()]
        self._next = max(numbers, default=-1) + 1
        return [result for segment in self.segments for result in read_segment(segment)]

    def append(self, result: dict[str, Any]) -> None:
        if self._open is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            path = self.dir / f"{self._next:06d}{SUFFIX}"
            self._next += 1
            self._open = path.open("ab")
            self.segments.append(path)
        # One write per line (the buffer is flushed at once), so another reader never sees half of one.
        self._open.write(json.dumps(result, sort_keys=True).encode() + b"\n")
        self._open.flush()

    def close_segment(self) -> Path | None:
        """Close the open segment (the next result starts another); the one closed, if any was open."""
        if self._open is None:
            return None
        self._open.close()
        self._open = None
        return self.segments[-1]

    def close(self) -> None:
        self.close_segment()
