"""Telemetry on disk: msgpack frames appended to segment files in ``state_dir/telemetry``.

A restarted agent reloads the newest samples from here, so its ring (and ``seq``) carry on. Each segment holds
at most one ring's worth of frames and only the newest ``keep`` segments stay, so the disk always holds at least
a full ring and never more than ``keep`` rings. Writes are buffered and flushed every ``flush_every`` frames (and
on rotation and close): a crash loses at most those. A frame cut short by a crash is dropped on reload.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import msgpack

from rawvm_agent.telemetry.sample import Sample, is_sample, pack

log = logging.getLogger("rawvm_agent.telemetry.store")

SEGMENT_GLOB = "samples-*.msgpack"
WRITE_BUFFER = 64 * 1024
READ_SIZE = 64 * 1024


def segment_name(number: int) -> str:
    return f"samples-{number:08d}.msgpack"


def _segment_number(path: Path) -> int:
    return int(path.stem.removeprefix("samples-"))


class Store:
    def __init__(self, directory: Path, segment_frames: int, keep: int = 2, flush_every: int = 5) -> None:
        if segment_frames < 1 or keep < 2:
            raise ValueError("a store needs segment_frames >= 1 and keep >= 2")
        self.directory = directory
        self.segment_frames = segment_frames
        self.keep = keep
        self.flush_every = flush_every
        self._file: BinaryIO | None = None
        self._number = 0
        self._frames_in_segment = 0
        self._unflushed = 0

    def segments(self) -> list[Path]:
        """Segment files, oldest first."""
        paths = [p for p in self.directory.glob(SEGMENT_GLOB) if p.stem.removeprefix("samples-").isdigit()]
        return sorted(paths, key=_segment_number)

    def load(self, on_frame: Callable[[Sample, bytes], None]) -> None:
        """Replay every valid frame on disk, oldest first, then open the newest segment for appending.

        Frames are handed over one at a time (the caller's ring keeps the newest), so reloading two hours
        of samples never holds them all in memory at once.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        segments = self.segments()
        last_count = 0
        for path in segments:
            last_count = self._read_segment(path, on_frame)
        if segments:
            self._number = _segment_number(segments[-1])
            self._frames_in_segment = last_count
        else:
            self._number = 1
        self._open()

    def _read_segment(self, path: Path, on_frame: Callable[[Sample, bytes], None]) -> int:
        """Replay the segment's valid frames; cut off a torn tail. Returns how many frames it held."""
        count = 0
        good_offset = 0
        with path.open("rb") as f:
            unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False, read_size=READ_SIZE)
            try:
                for obj in unpacker:
                    good_offset = unpacker.tell()
                    if is_sample(obj):
                        on_frame(obj, pack(obj))
                        count += 1
            except (msgpack.UnpackException, ValueError) as exc:
                log.warning("%s: unreadable data after byte %d (%s); dropping the rest", path, good_offset, exc)
        if good_offset < path.stat().st_size:
            # A torn final frame (crash mid-write): drop it so appends start on a frame boundary.
            with path.open("r+b") as f:
                f.truncate(good_offset)
        return count

    def _open(self) -> None:
        path = self.directory / segment_name(self._number)
        self._file = path.open("ab", buffering=WRITE_BUFFER)

    def append(self, frame: bytes) -> None:
        if self._file is None:
            raise RuntimeError("Store.load() must run before append()")
        if self._frames_in_segment >= self.segment_frames:
            self._rotate()
        self._file.write(frame)
        self._frames_in_segment += 1
        self._unflushed += 1
        if self._unflushed >= self.flush_every:
            self.flush()

    def _rotate(self) -> None:
        assert self._file is not None
        self._file.close()
        self._number += 1
        self._frames_in_segment = 0
        self._unflushed = 0
        self._open()
        for old in self.segments()[: -self.keep]:
            old.unlink(missing_ok=True)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        self._unflushed = 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
