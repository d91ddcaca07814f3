"""Fresh code on a warm machine: the laptop asks which project files the machine last received (by sha256) and
sends only those that changed, as one tar.gz unpacked over the work dir.

- ``GET /v1/code``: ``{"files": {path: sha256}}`` of what the machine received: at first the code archives of
  its bundle, then each sync on top. Files tasks wrote are not in it (they are not the project's).
- ``POST /v1/code``: a tar.gz body (streamed, up to ``MAX_SYNC_BYTES``) of changed files; unpacked with the same
  rules as the bundle's code (no links, no absolute paths, no ``..``). Answers ``{"files": N}``.

The record lives in ``<state_dir>/code-sync.json``; hashes only, no content.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import tarfile
import tempfile
from pathlib import Path

from aiohttp import web

from rawvm_agent.app import AGENT_KEY, Agent
from rawvm_agent.install import MANIFEST, BundleError, InstallError, parse_manifest, unpack_code
from rawvm_agent.state import write_json_atomic

routes = web.RouteTableDef()
MAX_SYNC_BYTES = 1 << 30
RECORD = "code-sync.json"
_LOCK_KEY: web.AppKey[asyncio.Lock] = web.AppKey("code_sync_lock", asyncio.Lock)


def add_routes(app: web.Application) -> None:
    app.add_routes(routes)
    app[_LOCK_KEY] = asyncio.Lock()


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def archive_hashes(archive: Path) -> dict[str, str]:
    """``{path: sha256}`` of every regular file in a tar.gz, paths as they unpack (``./`` dropped)."""
    out: dict[str, str] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if member.isfile() and (handle := tar.extractfile(member)) is not None:
                name = member.name.removeprefix("./")
                digest = hashlib.sha256()
                while block := handle.read(1 << 16):
                    digest.update(block)
                out[name] = digest.hexdigest()
    return out


def _touch(work_dir: Path, names: dict[str, str]) -> None:
    """Give the files just unpacked the time now: archives carry mtime 0, and Python trusts a ``__pycache__``
    entry whose source has the same mtime and size, so an edit of the same length would run the old code."""
    for name in names:
        with contextlib.suppress(OSError):
            os.utime(work_dir / name)


def received(agent: Agent) -> dict[str, str]:
    """What the machine has received: the sync record, else its bundle's code archives."""
    record = agent.state_dir / RECORD
    try:
        files = json.loads(record.read_text(encoding="utf-8"))["files"]
        if isinstance(files, dict):
            return {str(k): str(v) for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    bundle = agent.installer.bundle_dir
    try:
        manifest = parse_manifest((bundle / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, BundleError):
        return {}
    out: dict[str, str] = {}
    for code in manifest.of_kind("code"):
        try:
            out.update(archive_hashes(bundle / code.path))
        except (OSError, tarfile.TarError):
            continue
    return out


@routes.get("/v1/code")
async def get_code(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    async with request.app[_LOCK_KEY]:
        files = await asyncio.to_thread(received, agent)
    return web.json_response({"files": files})


@routes.post("/v1/code")
async def post_code(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    if agent.env is None:
        return _error(409, f"the environment is not ready (phase {agent.state.phase}): no work dir to sync into")
    work_dir = agent.env.work_dir
    async with request.app[_LOCK_KEY]:
        with tempfile.TemporaryDirectory(dir=agent.state_dir) as tmp:
            archive = Path(tmp) / "sync.tar.gz"
            size = 0
            with archive.open("wb") as out:
                async for chunk in request.content.iter_chunked(1 << 16):
                    size += len(chunk)
                    if size > MAX_SYNC_BYTES:
                        return _error(413, f"a sync carries at most {MAX_SYNC_BYTES >> 20} MiB")
                    out.write(chunk)
            try:
                files = await asyncio.to_thread(archive_hashes, archive)
                await asyncio.to_thread(unpack_code, archive, work_dir)
                await asyncio.to_thread(_touch, work_dir, files)
            except (tarfile.TarError, OSError, EOFError, InstallError) as exc:
                return _error(400, f"cannot unpack the sync archive: {exc}")
            known = await asyncio.to_thread(received, agent)
            known.update(files)
            write_json_atomic(agent.state_dir / RECORD, {"files": known})
    return web.json_response({"files": len(files)})
