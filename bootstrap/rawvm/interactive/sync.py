"""``rawvm notebook``'s two-way sync between the project directory here and the machine's work dir.

Each round compares three states of every file by sha256: the laptop's (``synctree.scan``), the machine's (listed
over ``GET /v1/sync``) and the one both sides held after the previous round (``base``). Only the side that moved
away from ``base`` changed, so its version (or its deletion) goes to the other side; a file changed on both sides
keeps the laptop's version and the machine's is saved here beside it as ``NAME.remote-YYYYmmdd-HHMMSS``. A file
new on both sides with different contents counts as changed on both (so the first round, with nothing shared yet,
never overwrites the machine's notebooks without a copy). Contents travel over ``GET /v1/files`` (filestream:
streamed, sha256-checked, renamed into place only when whole).

A round runs at once when watchdog sees a change here (laptop edits reach the machine within about a second)
and every ``POLL_S`` otherwise (notebooks saved on the machine come back within a couple of seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rawvm_agent.filestream import TransferError, receive_and_answer, send_and_check
from rawvm_agent.synctree import HashCache, safe_relative, scan
from rawvm_agent.wsframes import SessionClosed, receive, send_json

from rawvm.agent.client import AgentClient, AgentError, AgentWebSocket
from rawvm.errors import RawvmError

POLL_S = 1.0  # between two looks at the machine's side
SETTLE_S = 0.2  # after a local change, for the editor's other writes of the same save


@dataclass
class Counts:
    """What one round moved."""

    sent: int = 0
    received: int = 0
    deleted: int = 0
    conflicts: int = 0


def conflict_name(path: Path, when: float) -> Path:
    """Where the machine's side of a conflicting file is kept: ``NAME.remote-YYYYmmdd-HHMMSS`` beside it."""
    return path.with_name(f"{path.name}.remote-{time.strftime('%Y%m%d-%H%M%S', time.localtime(when))}")


class GitIgnored:
    """Which paths the project's ``.gitignore`` rules leave out (``git check-ignore``; tracked files never are),
    when ``root`` is in a git work tree: those stay where they are on both sides, as the launch's code.tar.gz
    leaves them out (a ``.env`` of secrets never travels). Answers are kept until a ``.gitignore`` changes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        inside = self._git("rev-parse", "--is-inside-work-tree")
        self.active = inside is not None and inside.returncode == 0 and inside.stdout.strip() == b"true"
        self._known: dict[str, bool] = {}
        self._rules: dict[str, str] = {}

    def _git(self, *args: str, given: bytes = b"") -> subprocess.CompletedProcess[bytes] | None:
        try:
            return subprocess.run(["git", "-C", str(self.root), *args], input=given, capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None

    def ignored(self, files: dict[str, str], others: set[str]) -> set[str]:
        """Those of ``files`` (this side's path -> sha256) and ``others`` the rules leave out."""
        if not self.active:
            return set()
        rules = {rel: sha for rel, sha in files.items() if rel.rsplit("/", 1)[-1] == ".gitignore"}
        if rules != self._rules:
            self._rules, self._known = rules, {}
        unknown = sorted((set(files) | others) - set(self._known))
        if unknown:
            done = self._git("check-ignore", "-z", "--stdin", given="\0".join(unknown).encode() + b"\0")
            out = done.stdout if done is not None and done.returncode in (0, 1) else b""
            hits = {part.decode(errors="replace") for part in out.split(b"\0") if part}
            self._known.update({rel: rel in hits for rel in unknown})
        return {rel for rel in set(files) | others if self._known.get(rel)}


class TwoWaySync:
    """The sync of ``root`` with the machine behind ``client``; ``ws`` is an open ``GET /v1/sync`` session."""

    def __init__(self, client: AgentClient, ws: AgentWebSocket, root: Path, say: Callable[[str], None]) -> None:
        self.client, self.ws, self.root, self.say = client, ws, root, say
        self.base: dict[str, str] = {}  # relative path -> sha256 both sides held after the last round
        self.cache = HashCache()
        self.git = GitIgnored(root)
        self.wake = asyncio.Event()  # set (from watchdog's thread, through the loop) when a local file changed

    async def _ask(self, message: dict[str, object]) -> dict[str, object]:
        await send_json(self.ws, message)
        try:
            answer = await receive(self.ws, 60.0)
        except (SessionClosed, TimeoutError) as exc:
            raise RawvmError(f"the sync session with the machine ended: {exc or 'no answer'}") from None
        if not isinstance(answer, dict):
            raise RawvmError("the machine's sync session sent bytes where a listing was due")
        return answer

    async def remote(self) -> dict[str, str]:
        """The machine's files: relative path -> sha256."""
        answer = await self._ask({"list": True})
        files = answer.get("files")
        if not isinstance(files, dict):
            raise RawvmError(f"the machine's sync session answered no listing: {answer.get('error', answer)}")
        return {str(rel): str(row[2]) for rel, row in files.items()}

    def local(self) -> dict[str, str]:
        """This side's files: relative path -> sha256."""
        return {rel: entry.sha256 for rel, entry in scan(self.root, self.cache).items()}

    async def push(self, rel: str) -> None:
        async with self.client.websocket("/v1/files") as ws:
            await send_json(ws, {"op": "put", "path": rel})
            await send_and_check(ws, self.root / rel)

    async def pull(self, rel: str, dest: Path) -> None:
        async with self.client.websocket("/v1/files") as ws:
            await send_json(ws, {"op": "get", "path": rel})
            await receive_and_answer(ws, dest)

    async def round(self) -> Counts:
        """Compare both sides with ``base`` and move what changed (module docstring); what it moved."""
        remote = await self.remote()
        local = await asyncio.to_thread(self.local)
        left_out = await asyncio.to_thread(self.git.ignored, local, set(remote) | set(self.base))
        counts = Counts()
        for rel in sorted((set(local) | set(remote) | set(self.base)) - left_out):
            mine, theirs, before = local.get(rel), remote.get(rel), self.base.get(rel)
            path = safe_relative(self.root, rel)
            if path is None:
                continue  # a name the machine should not have sent: never written here
            try:
                await self._settle(rel, path, mine, theirs, before, counts)
            except (TransferError, AgentError, OSError) as exc:  # it moved under us: the next round looks again
                self.say(f"sync: {rel}: {exc} (trying again)")
        return counts

    async def _settle(
        self, rel: str, path: Path, mine: str | None, theirs: str | None, before: str | None, counts: Counts
    ) -> None:
        if mine == theirs:
            if mine is None:
                self.base.pop(rel, None)
            else:
                self.base[rel] = mine
            return
        if theirs == before:  # only the laptop's side changed
            await self._to_machine(rel, mine, counts)
        elif mine == before or mine is None:  # only the machine's changed, or deleted here and edited there
            await self._to_laptop(rel, path, mine, theirs, counts)
        elif theirs is None:
            await self._to_machine(rel, mine, counts)  # deleted there, edited here: the edit wins
        else:  # changed on both sides: the laptop's wins, the machine's is kept beside it
            saved = conflict_name(path, time.time())
            await self.pull(rel, saved)
            await self.push(rel)
            self.base[rel] = mine
            counts.conflicts += 1
            self.say(f"sync: {rel} changed on both sides: kept this one, the machine's is saved as {saved.name}")

    async def _to_machine(self, rel: str, mine: str | None, counts: Counts) -> None:
        if mine is None:
            await self._ask({"delete": rel})
            self.base.pop(rel, None)
            counts.deleted += 1
            self.say(f"sync: deleted {rel} on the machine")
        else:
            await self.push(rel)
            self.base[rel] = mine
            counts.sent += 1
            self.say(f"sync: sent {rel}")

    async def _to_laptop(self, rel: str, path: Path, mine: str | None, theirs: str | None, counts: Counts) -> None:
        now = self.cache.entry(path)
        if (now.sha256 if now else None) != mine:
            return  # edited here since the scan: the next round sees both changes
        if theirs is None:
            path.unlink(missing_ok=True)
            self.base.pop(rel, None)
            counts.deleted += 1
            self.say(f"sync: deleted {rel} here (deleted on the machine)")
        else:
            await self.pull(rel, path)
            self.base[rel] = theirs
            counts.received += 1
            self.say(f"sync: received {rel}")

    async def run(self) -> None:
        """Rounds until cancelled: at once after a local change, else every ``POLL_S``."""
        while True:
            await self.round()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), POLL_S)
                await asyncio.sleep(SETTLE_S)
            self.wake.clear()


@contextlib.contextmanager
def watching(root: Path, wake: asyncio.Event) -> Iterator[None]:
    """Watchdog on ``root`` (recursive) for the block: any change sets ``wake`` on this event loop."""
    from watchdog.events import FileSystemEvent, FileSystemEventHandler
    from watchdog.observers import Observer

    loop = asyncio.get_running_loop()

    class Waker(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            if event.event_type not in ("opened", "closed_no_write"):
                loop.call_soon_threadsafe(wake.set)

    observer = Observer()
    observer.schedule(Waker(), str(root), recursive=True)
    observer.daemon = True
    observer.start()
    try:
        yield
    finally:
        observer.stop()
        observer.join(timeout=5)
