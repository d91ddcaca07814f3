"""A file or a directory tree over a websocket, streamed, every file sha256-checked: ``rawvm cp`` both ways.

The sender says what the root is, then each directory and each file: a header, the file's bytes in binary
messages of at most ``CHUNK_BYTES`` (never the whole file in memory), and the sha256 of what it read. The receiver
writes each file beside its destination under a temporary name, hashing what arrives, and renames it into place
only when its digest matches the sender's: a cut or damaged transfer leaves no half file under the real name.
The receiver then answers one verdict (``{"ok": ...}`` or ``{"error": ...}``). One protocol, both directions,
so a laptop-to-machine copy and a machine-to-laptop copy are checked the same way.

    {"root": "file"|"dir", "name": NAME, "contents": BOOL}
    {"dir": REL}                                  a directory ("" is the root itself)
    {"file": REL, "mode": M, "size": N}  <binary>... {"sha256": HEX}
    {"end": true, "files": F, "bytes": B}
    receiver: {"ok": true, "files": F, "bytes": B}  or  {"error": MESSAGE}

Placement (the receiver's side), as ``cp -r`` with rsync's trailing slash: a file or a directory goes into DEST
under NAME when DEST is a directory or ends in ``/``, else it becomes DEST; a directory sent with ``contents``
(its source written ``dir/``) puts what it holds into DEST itself. Directories are made as needed; files already
there that the copy does not name stay.
Relative paths from the sender are refused when absolute or climbing out (``..``): a damaged or hostile peer
cannot write outside DEST. The sender follows symlinks to files and leaves out links to directories and
anything that is neither a file nor a directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from rawvm_agent.wsframes import CHUNK_BYTES, SessionClosed, Socket, receive, send_json


class TransferError(Exception):
    """A copy that cannot go on; the message is one line for the user."""


@dataclass
class Totals:
    files: int = 0
    bytes: int = 0


def _walk(root: Path) -> list[tuple[str, Path]]:
    """("dir" | "file", path) under ``root`` in a stable order, directories before what they hold."""
    entries: list[tuple[str, Path]] = []
    for top, dirs, files in os.walk(root):
        dirs.sort()
        entries.append(("dir", Path(top)))
        entries.extend(("file", Path(top) / name) for name in sorted(files) if (Path(top) / name).is_file())
    return entries


async def send_tree(ws: Socket, source: Path, *, contents: bool = False) -> Totals:
    """Send ``source`` (a file or a directory; ``contents``: what the directory holds, not itself) and return what
    was sent; the receiver's verdict is read by ``await_verdict``. TransferError when ``source`` is neither."""
    totals = Totals()
    name = source.name or source.resolve().name
    if source.is_file():
        await send_json(ws, {"root": "file", "name": name})
        await _send_file(ws, source, "", totals)
    elif source.is_dir():
        await send_json(ws, {"root": "dir", "name": name, "contents": contents})
        for kind, path in _walk(source):
            rel = path.relative_to(source).as_posix()
            if kind == "dir":
                await send_json(ws, {"dir": "" if rel == "." else rel})
            else:
                await _send_file(ws, path, rel, totals)
    else:
        raise TransferError(f"{source}: no such file or directory")
    await send_json(ws, {"end": True, "files": totals.files, "bytes": totals.bytes})
    return totals


async def _send_file(ws: Socket, path: Path, rel: str, totals: Totals) -> None:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            await send_json(ws, {"file": rel, "mode": os.fstat(handle.fileno()).st_mode & 0o777, "size": size})
            while chunk := handle.read(CHUNK_BYTES):
                digest.update(chunk)
                totals.bytes += len(chunk)
                await ws.send_bytes(chunk)
    except OSError as exc:
        raise TransferError(f"{path}: {exc.strerror or exc}") from None
    totals.files += 1
    await send_json(ws, {"sha256": digest.hexdigest()})


async def send_and_check(ws: Socket, source: Path, *, contents: bool = False) -> dict[str, Any]:
    """The sending side's whole part: ``send_tree``, then the receiver's verdict. A local failure (an unreadable
    file) is told to the receiver before it is raised; a receiver that stopped reading gets its own words raised."""
    try:
        await send_tree(ws, source, contents=contents)
    except TransferError as exc:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await send_json(ws, {"abort": str(exc)})
        raise
    except ConnectionError:
        pass  # the receiver stopped the copy and closed: its verdict says why
    return await await_verdict(ws)


async def await_verdict(ws: Socket) -> dict[str, Any]:
    """The receiver's answer after ``send_tree``: its totals, or TransferError with its words."""
    try:
        verdict = await receive(ws)
    except SessionClosed as exc:
        raise TransferError(f"the copy ended without an answer: {exc}") from None
    if not isinstance(verdict, dict) or "error" in verdict or not verdict.get("ok"):
        words = verdict.get("error") if isinstance(verdict, dict) else "an unexpected answer"
        raise TransferError(str(words))
    return verdict


def _inside(dest: Path, rel: str) -> Path:
    """``dest / rel``, refusing a path the sender should never send (absolute, or with ``..``)."""
    if not rel:
        return dest
    parts = PurePosixPath(rel).parts
    if PurePosixPath(rel).is_absolute() or any(p in ("..", ".", "") for p in parts) or "\0" in rel:
        raise TransferError(f"refusing the path {rel[:200]!r} from the other end")
    return dest.joinpath(*parts)


async def _next(ws: Socket) -> bytes | dict[str, Any]:
    try:
        message = await receive(ws)
    except SessionClosed as exc:
        raise TransferError(f"the copy was cut off: {exc}") from None
    if isinstance(message, dict) and "abort" in message:
        raise TransferError(str(message["abort"]))
    if isinstance(message, dict) and "error" in message:  # the machine refused before sending anything
        raise TransferError(str(message["error"]))
    return message


async def receive_tree(ws: Socket, dest: Path, *, into_dir: bool = False) -> Totals:
    """Receive what ``send_tree`` sends into ``dest`` (placement in the module's docstring; ``into_dir``: DEST was
    written with a trailing ``/``, which ``Path`` drops); TransferError on anything wrong, the files verified so
    far left in place."""
    header = await _next(ws)
    if not isinstance(header, dict) or header.get("root") not in ("file", "dir"):
        raise TransferError("the other end sent no root header")
    whole = header["root"] == "file" or not header.get("contents")
    if whole and (into_dir or dest.is_dir()):
        dest = _inside(dest, str(header.get("name") or ""))
    totals = Totals()
    while True:
        message = await _next(ws)
        if not isinstance(message, dict):
            raise TransferError("file data came without a file header")
        if message.get("end"):
            return totals
        if "dir" in message:
            target = _inside(dest, str(message["dir"]))
            try:
                target.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise TransferError(f"{target}: {exc.strerror or exc}") from None
        elif "file" in message:
            await _receive_file(ws, _inside(dest, str(message["file"])), message, totals)
        else:
            raise TransferError(f"an unknown message from the other end: {sorted(message)[:4]}")


async def _receive_file(ws: Socket, target: Path, header: dict[str, Any], totals: Totals) -> None:
    size, mode = header.get("size"), header.get("mode", 0o644)
    if not isinstance(size, int) or size < 0 or not isinstance(mode, int):
        raise TransferError("a file header without a size")
    partial = target.with_name(f".{target.name}.rawvm-partial-{secrets.token_hex(4)}")
    digest = hashlib.sha256()
    received = 0
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with partial.open("wb") as handle:
            while received < size:
                chunk = await _next(ws)
                if not isinstance(chunk, bytes):
                    raise TransferError(f"{target.name}: the data stopped after {received} of {size} bytes")
                received += len(chunk)
                if received > size:
                    raise TransferError(f"{target.name}: more data than the {size} bytes announced")
                digest.update(chunk)
                handle.write(chunk)
        trailer = await _next(ws)
        if not isinstance(trailer, dict) or trailer.get("sha256") != digest.hexdigest():
            raise TransferError(f"{target}: sha256 mismatch, the copy is damaged (not written)")
        os.chmod(partial, mode & 0o777)
        os.replace(partial, target)
    except OSError as exc:
        raise TransferError(f"{target}: {exc.strerror or exc}") from None
    finally:
        partial.unlink(missing_ok=True)
    totals.files += 1
    totals.bytes += received


async def receive_and_answer(ws: Socket, dest: Path, *, into_dir: bool = False) -> Totals:
    """``receive_tree`` and the verdict sent back: the receiving side's whole part. TransferError after the
    error verdict was sent (when the socket still takes it)."""
    try:
        totals = await receive_tree(ws, dest, into_dir=into_dir)
    except TransferError as exc:
        with contextlib.suppress(ConnectionError, RuntimeError):  # the other end is gone: nobody to tell
            await send_json(ws, {"error": str(exc)})
        raise
    await send_json(ws, {"ok": True, "files": totals.files, "bytes": totals.bytes})
    return totals
