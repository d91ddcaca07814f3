"""Fresh code on warm machines: before a task runs on an existing cluster, send each machine the project files
whose sha256 differs from what it last received (``GET``/``POST /v1/code`` on the agent), and nothing else; and
when the environment changed since its bundle was locked (its fingerprint differs), lock it again for the
machines' target and have each install the difference (``POST /v1/environment``: ``uv pip sync``).

The project's files are the ones ``code.tar.gz`` is made of (``rawvm_resolver.project``: git's view, or a walk,
under the same size caps), so a sync never sends what a launch would not. A file deleted here stays on the
machines (it is not the project's any more, but a task may still read it).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import tarfile
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rawvm.agent.client import AgentClient
from rawvm.env_fingerprint import environment_fingerprint
from rawvm.files import sha256_file
from rawvm.options import Environment


@dataclass(frozen=True)
class SyncReport:
    """What one sync sent: files and bytes (compressed) per machine."""

    sent: dict[str, tuple[int, int]]

    def line(self) -> str:
        """``sync: sent 2 changed files (1.3 kB) to m0, m1`` or ``sync: the machines have the project's files``."""
        busy = {mid: v for mid, v in self.sent.items() if v[0]}
        if not busy:
            return "sync: the machines have the project's current files"
        files = max(n for n, _ in busy.values())
        size = max(b for _, b in busy.values())
        plural = "s" if files != 1 else ""
        return f"sync: sent {files} changed file{plural} ({_size(size)}) to {', '.join(sorted(busy))}"


def _size(n: int) -> str:
    for unit, step in (("MB", 1e6), ("kB", 1e3)):
        if n >= step:
            return f"{n / step:.1f} {unit}"
    return f"{n} B"


def project_hashes(root: Path) -> tuple[Path, dict[str, str]]:
    """The project's files (as code.tar.gz takes them) and each one's sha256."""
    from rawvm_resolver.project import list_project_files

    project = list_project_files(root)
    out = {}
    for relative in project.files:
        with (project.root / relative).open("rb") as handle:
            out[relative] = hashlib.file_digest(handle, "sha256").hexdigest()
    return project.root, out


def changed_archive(root: Path, names: list[str]) -> bytes:
    """A tar.gz of ``names`` under ``root``, made as code.tar.gz is made."""
    from rawvm_resolver.project import ProjectFiles, code_archive

    return code_archive(ProjectFiles(root=root, files=tuple(sorted(names)), skipped=()))


States = asyncio.Future[dict[str, dict[str, Any]]]  # each machine's GET /v1/code answer, by short id


def code_states(agents: dict[str, AgentClient]) -> States:
    """Ask each machine once what it holds (``GET /v1/code``), for both checks (its files, its environment); the
    answers as a future, so the checks' local work runs while the request is out."""

    async def ask() -> dict[str, dict[str, Any]]:
        answers = await asyncio.gather(*(client.code_state() for client in agents.values()))
        return dict(zip(agents, answers, strict=True))

    return asyncio.ensure_future(ask())


async def sync_code(agents: dict[str, AgentClient], project_dir: Path, states: States | None = None) -> SyncReport:
    """Send each machine the project files it lacks or holds in another version; what was sent. ``states``: the
    machines' ``code_states`` when already asked (else asked here)."""
    hashing = asyncio.ensure_future(asyncio.to_thread(project_hashes, project_dir))
    held = await (states if states is not None else code_states(agents))
    root, local = await hashing
    archives: dict[tuple[str, ...], bytes] = {}

    async def one(mid: str, client: AgentClient) -> tuple[int, int]:
        remote = {str(k): str(v) for k, v in (held.get(mid, {}).get("files") or {}).items()}
        changed = tuple(sorted(name for name, digest in local.items() if remote.get(name) != digest))
        if not changed:
            return 0, 0
        if changed not in archives:
            archives[changed] = await asyncio.to_thread(changed_archive, root, list(changed))
        await client.send_code(archives[changed])
        return len(changed), len(archives[changed])

    results = await asyncio.gather(*(one(mid, c) for mid, c in agents.items()))
    return SyncReport(dict(zip(agents, results, strict=True)))


def _relock(env: Environment, state: dict[str, Any], dest: Path) -> tuple[Path, list[tuple[str, str]]]:
    """Lock ``env`` again for the machine's target: the new bundle and its files ``(path, kind)`` (code left
    out). Only a changed environment gets here, so a warm run never imports the resolver's lock modules."""
    from rawvm_resolver import lock
    from rawvm_resolver.target import DEFAULT_GLIBC, Target

    raw = state.get("target") or {}
    target = Target(
        arch=str(raw.get("arch", "x86_64")),
        python=str(raw.get("python", "")),
        glibc=str(raw.get("glibc", "")) or DEFAULT_GLIBC,
        accelerator=str(raw.get("accelerator", "cpu")),
        cuda=str(raw.get("cuda", "")),
    )
    locked = lock(env.source, target, dest, project_dir=env.project_dir, pypi_only=env.pypi_only)
    manifest = tomllib.loads((locked.bundle_dir / "rawvm-env.toml").read_text(encoding="utf-8"))
    files = [(str(f["path"]), str(f["kind"])) for f in manifest.get("files", []) if f.get("kind") != "code"]
    return locked.bundle_dir, files


def _bundle_archive(bundle: Path, files: list[tuple[str, str]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in ["rawvm-env.toml", *(path for path, _ in files)]:
            tar.add(bundle / name, arcname=name, recursive=False)
    return buffer.getvalue()


async def sync_environment(agents: dict[str, AgentClient], env: Environment, states: States | None = None) -> str:
    """When the environment changed since the machines' bundle was locked (its fingerprint differs from the first
    machine's; ``rawvm.env_fingerprint``), lock it again and install the difference on each (uv changes only what
    differs); the progress line, "" when nothing changed. ``states``: the machines' ``code_states`` when already
    asked (else asked here)."""
    if not agents:
        return ""
    fingerprint = asyncio.ensure_future(asyncio.to_thread(environment_fingerprint, env.source))
    held = await (states if states is not None else code_states(agents))
    state = held.get(next(iter(agents)), {})
    if not state.get("locks"):
        return ""  # no locked environment there (an agent run by hand)
    if await fingerprint == state.get("fingerprint"):
        return ""
    with tempfile.TemporaryDirectory(prefix="rawvm-relock-") as scratch:
        bundle, files = await asyncio.to_thread(_relock, env, state, Path(scratch) / "bundle")
        locks = {path: sha256_file(bundle / path) for path, kind in files if kind == "pylock"}
        if locks == state.get("locks"):
            return ""
        archive = await asyncio.to_thread(_bundle_archive, bundle, files)
    counts = await asyncio.gather(*(c.send_environment(archive) for c in agents.values()))
    return f"sync: the environment changed: installed its new lock ({max(counts)} packages) on {', '.join(agents)}"
