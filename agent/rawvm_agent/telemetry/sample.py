"""A telemetry sample: ``{"seq": int, "t": unix seconds, <collector name>: value, …, "errors": {…}}``.

``seq`` increases by one per sample and keeps increasing across agent restarts; ``errors`` (present only when
some collector failed) maps that collector's name to its error, and the failing collector's key is absent.
Samples travel and rest as msgpack maps (one frame each, self-delimiting, so frames simply concatenate).
"""

from __future__ import annotations

from typing import Any

import msgpack

Sample = dict[str, Any]


def pack(sample: Sample) -> bytes:
    data: bytes = msgpack.packb(sample, use_bin_type=True)
    return data


def unpack(frame: bytes) -> Sample:
    sample: Sample = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    return sample


def is_sample(obj: object) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("seq"), int) and isinstance(obj.get("t"), int | float)


def pack_array(frames: list[bytes]) -> bytes:
    """A msgpack array of already-packed samples, without unpacking and packing them again."""
    n = len(frames)
    if n < 16:
        header = bytes([0x90 | n])
    elif n < 1 << 16:
        header = b"\xdc" + n.to_bytes(2, "big")
    else:
        header = b"\xdd" + n.to_bytes(4, "big")
    return b"".join([header, *frames])  # one copy: a full hour is several MB
