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


async def sync_code(agents: dict[str, AgentClient], project_dir: Path) -> SyncReport:
    """Send each machine the project files it lacks or holds in another version; what was sent."""
    root, local = await asyncio.to_thread(project_hashes, project_dir)
    archives: dict[tuple[str, ...], bytes] = {}

    async def one(client: AgentClient) -> tuple[int, int]:
        remote = await client.code_files()
        changed = tuple(sorted(name for name, digest in local.items() if remote.get(name) != digest))
        if not changed:
            return 0, 0
        if changed not in archives:
            archives[changed] = await asyncio.to_thread(changed_archive, root, list(changed))
        await client.send_code(archives[changed])
        return len(changed), len(archives[changed])

    results = await asyncio.gather(*(one(c) for c in agents.values()))
    return SyncReport(dict(zip(agents, results, strict=True)))


def _relock(env: Environment, state: dict[str, Any], dest: Path) -> tuple[Path, list[tuple[str, str]]] | None:
    """Lock ``env`` again for the machine's target when its fingerprint differs from the machine's bundle's:
    the new bundle and its files ``(path, kind)`` (code left out); None when the environment is unchanged."""
    from rawvm_resolver import lock
    from rawvm_resolver.scan import scan
    from rawvm_resolver.target import DEFAULT_GLIBC, Target

    if scan(env.source).fingerprint() == state.get("fingerprint"):
        return None
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


async def sync_environment(agents: dict[str, AgentClient], env: Environment) -> str:
    """When the environment changed since the machines' bundle was locked, lock it again and install the
    difference on each (uv changes only what differs); the progress line, "" when nothing changed."""
    if not agents:
        return ""
    state = await next(iter(agents.values())).code_state()
    if not state.get("locks"):
        return ""  # no locked environment there (an agent run by hand)
    with tempfile.TemporaryDirectory(prefix="rawvm-relock-") as scratch:
        relocked = await asyncio.to_thread(_relock, env, state, Path(scratch) / "bundle")
        if relocked is None:
            return ""
        bundle, files = relocked
        locks = {path: sha256_file(bundle / path) for path, kind in files if kind == "pylock"}
        if locks == state.get("locks"):
            return ""
        archive = await asyncio.to_thread(_bundle_archive, bundle, files)
    counts = await asyncio.gather(*(c.send_environment(archive) for c in agents.values()))
    return f"sync: the environment changed: installed its new lock ({max(counts)} packages) on {', '.join(agents)}"
