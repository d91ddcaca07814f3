"""Fresh code on warm machines: before a task runs on an existing cluster, send each machine the project files
whose sha256 differs from what it last received (``GET``/``POST /v1/code`` on the agent), and nothing else.

The project's files are the ones ``code.tar.gz`` is made of (``rawvm_resolver.project``: git's view, or a walk,
under the same size caps), so a sync never sends what a launch would not. A file deleted here stays on the
machines (it is not the project's any more, but a task may still read it).
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from pathlib import Path

from rawvm.agent.client import AgentClient


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
