"""Fresh code on a warm machine: the laptop asks which project files the machine last received (by sha256) and
sends only those that changed, as one tar.gz unpacked over the work dir.

- ``GET /v1/code``: ``{"files": {path: sha256}, "fingerprint": F, "locks": {path: sha256}, "target": {...}}``:
  the project files the machine received (at first the code archives of its bundle, then each sync on top; files
  tasks wrote are not in it), and its bundle's environment fingerprint, lock files and target.
- ``POST /v1/code``: a tar.gz body (streamed, up to ``MAX_SYNC_BYTES``) of changed files; unpacked with the same
  rules as the bundle's code (no links, no absolute paths, no ``..``). Answers ``{"files": N}``.

- ``POST /v1/environment``: a tar.gz of a newer bundle's manifest, lock and local packages; the difference is
  installed with uv (``Installer.update_lock``) before the answer, ``{"packages": N}``.

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
import tomllib
from pathlib import Path
from typing import Any

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


def bundle_state(agent: Agent) -> dict[str, Any]:
    """The bundle's source fingerprint, lock files and target, as its manifest says ({} without one)."""
    try:
        raw = tomllib.loads((agent.installer.bundle_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    locks = {str(f.get("path")): str(f.get("sha256")) for f in raw.get("files", []) if f.get("kind") == "pylock"}
    return {
        "fingerprint": str(raw.get("source", {}).get("fingerprint", "")),
        "locks": locks,
        "target": raw.get("target", {}),
    }


@routes.get("/v1/code")
async def get_code(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    async with request.app[_LOCK_KEY]:
        files = await asyncio.to_thread(received, agent)
    return web.json_response({"files": files, **bundle_state(agent)})


async def _receive(request: web.Request, archive: Path) -> web.Response | None:
    """Stream the body into ``archive``; a 413 answer when it is too big."""
    size = 0
    with archive.open("wb") as out:
        async for chunk in request.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > MAX_SYNC_BYTES:
                return _error(413, f"a sync carries at most {MAX_SYNC_BYTES >> 20} MiB")
            out.write(chunk)
    return None


@routes.post("/v1/environment")
async def post_environment(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    if agent.env is None or agent.env.venv is None:
        return _error(409, f"no environment to update (phase {agent.state.phase})")
    async with request.app[_LOCK_KEY]:
        with tempfile.TemporaryDirectory(dir=agent.state_dir) as tmp:
            archive, staged = Path(tmp) / "env.tar.gz", Path(tmp) / "bundle"
            if (refused := await _receive(request, archive)) is not None:
                return refused
            try:
                await asyncio.to_thread(unpack_code, archive, staged)
                # What the machine received of the project, before the bundle's manifest changes under it.
                write_json_atomic(agent.state_dir / RECORD, {"files": await asyncio.to_thread(received, agent)})
                packages = await agent.installer.update_lock(staged)
            except (OSError, InstallError) as exc:
                return _error(400, f"cannot update the environment: {exc}")
    return web.json_response({"packages": packages})


@routes.post("/v1/code")
async def post_code(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    if agent.env is None:
        return _error(409, f"the environment is not ready (phase {agent.state.phase}): no work dir to sync into")
    work_dir = agent.env.work_dir
    async with request.app[_LOCK_KEY]:
        with tempfile.TemporaryDirectory(dir=agent.state_dir) as tmp:
            archive = Path(tmp) / "sync.tar.gz"
            if (refused := await _receive(request, archive)) is not None:
                return refused
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
