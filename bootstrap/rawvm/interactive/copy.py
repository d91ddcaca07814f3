"""``rawvm cp SRC DST``: files and directory trees between the laptop and a machine, over ``GET /v1/files``.

One side is ``MACHINE:PATH`` (``m0:data/``), the other a local path; as with scp, a name before the first ``:``
that holds no ``/`` is a machine (write ``./a:b`` for a local file with a colon). The cluster is ``--cluster NAME``,
or the only cluster recorded here. A machine path is relative to the work dir tasks run in, unless absolute.
Placement follows ``cp -r`` with rsync's trailing slash (``rawvm_agent.filestream``): ``rawvm cp data/ m0:data``
makes the machine's ``data`` hold what the local ``data`` holds, ``rawvm cp m0:out .`` makes ``./out``.
Both directions stream in 1 MiB messages and check each file's sha256 before renaming it into place.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from rawvm_agent.filestream import TransferError, receive_and_answer, send_and_check
from rawvm_agent.wsframes import send_json

from rawvm import clusters
from rawvm.errors import RawvmError, UsageError
from rawvm.interactive.target import machine_client

_REMOTE = re.compile(r"(?P<machine>[^/:]+):(?P<path>.*)", re.DOTALL)


@dataclass(frozen=True)
class Endpoint:
    """One side of a copy: ``machine`` is "" for the laptop."""

    machine: str
    path: str

    @classmethod
    def parse(cls, raw: str) -> Endpoint:
        if match := _REMOTE.fullmatch(raw):
            return cls(match["machine"], match["path"] or ".")
        return cls("", raw)

    def __str__(self) -> str:
        return f"{self.machine}:{self.path}" if self.machine else self.path


def default_cluster(cluster: str) -> str:
    """``cluster`` when given, else the only cluster recorded here; a UsageError naming them otherwise."""
    if cluster:
        return cluster
    names = [record.name for record in clusters.all_records()]
    if len(names) == 1:
        return names[0]
    known = f" (clusters here: {', '.join(names)})" if names else " (none is recorded here: see 'rawvm up')"
    raise UsageError(f"name the cluster with --cluster NAME{known}")


def _size(count: int) -> str:
    return f"{count / (1 << 20):.1f} MiB" if count >= 1 << 20 else f"{count} bytes"


async def copy(source: str, destination: str, cluster: str) -> str:
    """Copy ``source`` to ``destination`` (one of them remote); the line that says what was copied."""
    src, dst = Endpoint.parse(source), Endpoint.parse(destination)
    if bool(src.machine) == bool(dst.machine):
        raise UsageError("one side of 'rawvm cp' is MACHINE:PATH (e.g. m0:data/) and the other a local path")
    if not src.machine and not Path(src.path).exists():
        raise UsageError(f"{src.path}: no such file or directory")
    remote = src if src.machine else dst
    started = time.monotonic()
    async with (
        machine_client(default_cluster(cluster), remote.machine) as (_, client),
        client.websocket("/v1/files") as ws,
    ):
        try:
            if dst.machine:
                await send_json(ws, {"op": "put", "path": dst.path})
                answer = await send_and_check(ws, Path(src.path), contents=src.path.endswith("/"))
                files, size = int(answer.get("files", 0)), int(answer.get("bytes", 0))
            else:
                await send_json(ws, {"op": "get", "path": src.path})
                totals = await receive_and_answer(ws, Path(dst.path), into_dir=dst.path.endswith("/"))
                files, size = totals.files, totals.bytes
        except TransferError as exc:
            raise RawvmError(f"cp {src} {dst}: {exc}") from None
    seconds = time.monotonic() - started
    plural = "" if files == 1 else "s"
    return f"copied {files} file{plural} ({_size(size)}) from {src} to {dst} in {seconds:.1f} s, each sha256-checked"
