"""Tasks: argv run inside the environment, output captured to capped files, secrets masked.

Each task lives in ``tasks/<id>/`` under the state dir: ``task.json`` (the record), ``stdout`` and
``stderr``. The agent reads the task's pipes itself (rather than handing it the files) so it can cap the
size, mask secret values and watch the write rate. A log file is made when its first byte comes: a task that
prints nothing has none, and readers take a missing log as empty (creating two files was a tiny task's largest
cost, issue 22). Processes start through rawvm_agent.spawn (no thread per child).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from rawvm_agent.config import TaskConfig
from rawvm_agent.environment import Environment
from rawvm_agent.logs import Redactor, StreamRedactor
from rawvm_agent.spawn import Child, PipeReader, spawn
from rawvm_agent.state import write_json_atomic

log = logging.getLogger("rawvm_agent.tasks")

STREAMS = ("stdout", "stderr")
READ_CHUNK = 1 << 16
CHATTY_WINDOW_S = 10.0
KILL_GRACE_S = 5.0


class TaskError(Exception):
    """A task request that cannot be run; the message is one line for the API caller."""


class NotReadyError(TaskError):
    """The agent cannot take tasks now (installing, failed, stopping); the API answers 409."""


class TaskState:
    RUNNING = "running"
    EXITED = "exited"  # ran to the end; see exit_code
    INTERRUPTED = "interrupted"  # killed by the agent's stop (idle, spot, shutdown, max_lifetime)
    LOST = "lost"  # was running when the agent itself died
    CANCELLED = "cancelled"  # stopped on request (POST /v1/tasks/{id}/cancel); its output so far is kept

    FINAL = frozenset({EXITED, INTERRUPTED, LOST, CANCELLED})


@dataclass
class TaskRecord:
    id: str
    argv: list[str]
    cwd: str
    state: str = TaskState.RUNNING
    exit_code: int | None = None
    started_at: float = 0.0
    ended_at: float | None = None
    pid: int | None = None
    bytes_written: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STREAMS, 0))
    bytes_dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STREAMS, 0))
    warnings: list[str] = field(default_factory=list)

    def public(self) -> dict[str, Any]:
        """What ``GET /v1/tasks/{id}`` returns. Env values are never part of it."""
        out = asdict(self)
        out.pop("pid")
        return out


@dataclass(frozen=True)
class TaskRequest:
    argv: list[str]
    env: dict[str, str]
    cwd: str
    secret_env: list[str]

    @classmethod
    def from_json(cls, body: Any) -> TaskRequest:
        if not isinstance(body, dict):
            raise TaskError("task request must be a JSON object {argv, env, cwd, secret_env}")
        argv, env = body.get("argv"), body.get("env", {}) or {}
        cwd, secret_env = body.get("cwd", "") or "", body.get("secret_env", []) or []
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise TaskError("'argv' must be a non-empty list of strings")
        if not argv[0] or any("\0" in a for a in argv):
            # exec() cannot take these: refuse them here, as a bad request, not later as an agent error.
            raise TaskError("'argv' strings must not hold a NUL character, and argv[0] must not be empty")
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise TaskError("'env' must be an object of string values")
        if bad := [k for k, v in env.items() if not _env_name_ok(k) or "\0" in v]:
            raise TaskError(
                f"'env' entry {bad[0][:64]!r}: names must be non-empty without '=' or NUL, values without NUL"
            )
        if not isinstance(cwd, str):
            raise TaskError("'cwd' must be a string")
        if "\0" in cwd:
            raise TaskError("'cwd' must not hold a NUL character")
        if not isinstance(secret_env, list) or not all(isinstance(s, str) for s in secret_env):
            raise TaskError("'secret_env' must be a list of env var names")
        return cls(argv=argv, env=env, cwd=cwd, secret_env=secret_env)


def _env_name_ok(name: str) -> bool:
    return bool(name) and "=" not in name and "\0" not in name


def task_cwd(work_dir: Path, cwd: str) -> Path:
    """``cwd`` (relative to the work dir) as a directory inside the work dir; symlinks and ``..`` that lead out
    of it, and absolute paths elsewhere, are refused: a task runs in the project's files, nowhere else."""
    root = work_dir.resolve()
    try:
        target = (root / cwd).resolve() if cwd else root
        inside, is_dir = target.is_relative_to(root), target.is_dir()
    except OSError as exc:  # a name too long, a symlink loop
        raise TaskError(f"cwd {cwd[:200]!r}: {exc.strerror or exc}") from None
    if not inside:
        raise TaskError(f"cwd {cwd[:200]!r} is outside the work dir: give a directory inside it (relative path)")
    if not is_dir:
        raise TaskError(f"cwd {cwd[:200]!r} is not a directory in the work dir")
    return target


class RateWatch:
    """Bytes written over the last ``window`` seconds, to spot a task flooding its logs."""

    def __init__(self, window: float = CHATTY_WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.clock = clock
        self.started = clock()
        self._events: deque[tuple[float, int]] = deque()
        self._total = 0

    def add(self, n: int) -> float:
        """Record ``n`` bytes; return the rate in bytes/s over the window (or since start, if shorter)."""
        now = self.clock()
        self._events.append((now, n))
        self._total += n
        while self._events and self._events[0][0] < now - self.window:
            self._total -= self._events.popleft()[1]
        span = max(min(self.window, now - self.started), 1.0)
        return self._total / span


class Task:
    def __init__(self, record: TaskRecord, directory: Path, *, own_record: bool = True) -> None:
        self.record = record
        self.dir = directory
        self.own_record = own_record  # False: the caller keeps the record (TaskManager.start)
        self.process: Child | None = None
        self.done = asyncio.Event()
        self._changed = asyncio.Condition()

    def log_path(self, stream: str) -> Path:
        return self.dir / stream

    def save(self) -> None:
        # No fsync: a task record lost to a power cut is a task that died with its machine either way.
        write_json_atomic(self.dir / "task.json", asdict(self.record), durable=False)

    async def notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_change(self, timeout: float) -> None:
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)


class TaskManager:
    def __init__(
        self,
        config: TaskConfig,
        tasks_dir: Path,
        redactor: Redactor,
        secret_env_names: Sequence[str] = (),
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.config = config
        self.dir = tasks_dir
        self.redactor = redactor
        self.secret_env_names = tuple(secret_env_names)
        self.on_change = on_change
        self.tasks: dict[str, Task] = {}
        self._live: dict[str, Task] = {}  # started by this process and not ended: what ``running`` looks at
        self.started_total = 0
        self.first_started_at: float | None = None  # the machine's first task (boot_phases.py)
        self._pumps: set[asyncio.Task[None]] = set()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._load_previous()

    def _load_previous(self) -> None:
        """Records of an earlier run of the agent; tasks that were running then died with it."""
        for meta in sorted(self.dir.glob("*/task.json")):
            try:
                record = TaskRecord(**json.loads(meta.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError):
                continue
            task = Task(record, meta.parent)
            if record.state == TaskState.RUNNING:
                record.state, record.ended_at = TaskState.LOST, time.time()
                task.save()
            task.done.set()
            self.tasks[record.id] = task

    # -- queries ----------------------------------------------------------------------------------------

    def get(self, task_id: str) -> Task | None:
        return self.tasks.get(task_id)

    @property
    def running(self) -> list[Task]:
        # Not every task ever run: the idle policy asks on each task's start and end, and a batch runs thousands.
        return [t for t in self._live.values() if t.record.state == TaskState.RUNNING]

    def last_ended_at(self) -> float | None:
        ended = [t.record.ended_at for t in self.tasks.values() if t.record.ended_at is not None]
        return max(ended, default=None)

    def counts(self) -> dict[str, int]:
        states = (TaskState.RUNNING, TaskState.EXITED, TaskState.INTERRUPTED, TaskState.LOST, TaskState.CANCELLED)
        out = dict.fromkeys(states, 0)
        for t in self.tasks.values():
            out[t.record.state] = out.get(t.record.state, 0) + 1
        return out

    def warnings(self) -> list[str]:
        return [f"task {t.record.id}: {w}" for t in self.tasks.values() for w in t.record.warnings]

    # -- start ------------------------------------------------------------------------------------------

    async def start(
        self, request: TaskRequest, env: Environment, base_environ: Mapping[str, str], *, own_record: bool = True
    ) -> Task:
        """Start the task; its record is written now, so a restarted agent lists it as lost.

        ``own_record`` False: the caller keeps the record (a batch: each attempt's exit code and times are in
        its result, and the batch reruns what has none), so none is written at the start, and at the end only
        into the directory the task's first output made; a task that prints nothing leaves no file, and its
        start and end are logged at debug level. On this path creating files (0.2-0.4 ms of kernel time each)
        and journal lines were most of a tiny task's cost (issue 22)."""
        secrets = [request.env[n] for n in request.secret_env if n in request.env]
        secrets += [v for n in self.secret_env_names if (v := request.env.get(n) or base_environ.get(n))]
        self.redactor.add(*secrets)

        cwd = task_cwd(env.work_dir, request.cwd)
        environ = env.task_environ(base_environ)
        environ.update(request.env)
        # PATH from the request would hide the environment's bin dir; keep the venv first.
        if "PATH" in request.env:
            environ["PATH"] = os.pathsep.join([str(env.bin_dir), request.env["PATH"]])

        task_id = uuid.uuid4().hex[:12]
        record = TaskRecord(id=task_id, argv=list(request.argv), cwd=str(cwd), started_at=time.time())
        task = Task(record, self.dir / task_id, own_record=own_record)
        if own_record:
            task.dir.mkdir(parents=True)
        try:
            # Its own session and process group, so a stop kills its children too.
            task.process, out, err = spawn(request.argv, cwd=cwd, env=environ)
        except (OSError, ValueError) as exc:
            # Not found, not executable, not a program (ENOEXEC), a name too long: the request's fault, a 400.
            with contextlib.suppress(OSError):
                task.dir.rmdir()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise TaskError(f"cannot run {request.argv[0][:200]!r}: {reason}") from None
        record.pid = task.process.pid
        if own_record:
            task.save()
        self.tasks[task_id] = self._live[task_id] = task
        if self.first_started_at is None:
            self.first_started_at = record.started_at
        self.started_total += 1
        if log.isEnabledFor(level := logging.INFO if own_record else logging.DEBUG):
            log.log(level, "task %s started: %s", task_id, self.redactor.redact(" ".join(request.argv)))
        pump = asyncio.create_task(self._run(task, out, err), name=f"task-{task_id}")
        self._pumps.add(pump)
        pump.add_done_callback(self._pumps.discard)
        self.on_change()
        return task

    async def _run(self, task: Task, out: PipeReader, err: PipeReader) -> None:
        assert task.process is not None
        rate = RateWatch()
        try:
            await asyncio.gather(self._pump(task, "stdout", out, rate), self._pump(task, "stderr", err, rate))
        finally:
            out.close()
            err.close()
        code = await task.process.wait()
        record = task.record
        record.exit_code = code
        record.ended_at = time.time()
        if record.state == TaskState.RUNNING:
            record.state = TaskState.EXITED
        if task.own_record or task.dir.exists():
            task.save()
        self._live.pop(record.id, None)
        task.done.set()
        log.log(
            logging.INFO if task.own_record else logging.DEBUG,
            "task %s %s with exit code %s",
            record.id,
            record.state,
            code,
        )
        await task.notify()
        self.on_change()

    async def _pump(self, task: Task, stream: str, pipe: PipeReader, rate: RateWatch) -> None:
        masker = StreamRedactor(self.redactor)
        cap = self.config.log_cap_bytes
        record = task.record
        opened: list[IO[bytes]] = []  # the log file, made by the first byte that is kept
        with contextlib.ExitStack() as closing:

            def write(data: bytes) -> None:
                room = max(cap - record.bytes_written[stream], 0)
                kept = data[:room]
                if kept:
                    if not opened:
                        task.dir.mkdir(parents=True, exist_ok=True)
                        opened.append(closing.enter_context(task.log_path(stream).open("ab")))
                    out = opened[0]
                    out.write(kept)
                    out.flush()
                    record.bytes_written[stream] += len(kept)
                if len(kept) < len(data):
                    if record.bytes_dropped[stream] == 0:
                        self._warn(task, f"{stream} reached the log cap of {cap} bytes; further output is dropped")
                    record.bytes_dropped[stream] += len(data) - len(kept)

            while chunk := await pipe.read(READ_CHUNK):
                bytes_per_s = rate.add(len(chunk))
                if bytes_per_s > self.config.chatty_bytes_per_s and not any("chatty" in w for w in record.warnings):
                    self._warn(
                        task,
                        f"chatty output: {bytes_per_s / 1e6:.1f} MB/s over {CHATTY_WINDOW_S:g}s "
                        f"(limit {self.config.chatty_bytes_per_s / 1e6:.1f} MB/s); consider logging less",
                    )
                write(masker.feed(chunk))
                await task.notify()
            write(masker.flush())
        await task.notify()

    def _warn(self, task: Task, message: str) -> None:
        task.record.warnings.append(message)
        log.warning("task %s: %s", task.record.id, message)
        task.save()
        self.on_change()

    # -- stop -------------------------------------------------------------------------------------------

    async def interrupt_all(self, grace: float = KILL_GRACE_S) -> None:
        """Stop every running task (SIGTERM to its process group, SIGKILL after ``grace``)."""
        await self.stop_tasks(self.running, TaskState.INTERRUPTED, grace)

    async def cancel(self, task: Task, grace: float = KILL_GRACE_S) -> None:
        """Stop one task on request, as ``interrupt_all`` stops them all; a task already ended is left as it is."""
        if task.record.state == TaskState.RUNNING:
            await self.stop_tasks([task], TaskState.CANCELLED, grace)

    async def stop_tasks(self, running: Sequence[Task], state: str, grace: float = KILL_GRACE_S) -> None:
        """Mark ``running`` as ``state``, SIGTERM each one's process group, SIGKILL those alive after ``grace``."""
        for task in running:
            task.record.state = state
            task.save()
            _signal_group(task, signal.SIGTERM)
        if not running:
            return
        waits = [asyncio.create_task(t.done.wait()) for t in running]
        _, pending = await asyncio.wait(waits, timeout=grace)
        for task in running:
            if not task.done.is_set():
                _signal_group(task, signal.SIGKILL)
        if pending:
            await asyncio.wait(pending, timeout=grace)
        for waiter in pending:
            waiter.cancel()

    async def close(self) -> None:
        await self.interrupt_all()
        for pump in list(self._pumps):
            pump.cancel()


def _signal_group(task: Task, sig: signal.Signals) -> None:
    if task.process is None or task.process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(task.process.pid, sig)


def read_log(path: Path, offset: int, limit: int) -> bytes:
    """Up to ``limit`` bytes of a task's log from ``offset``; a log not made yet (no output so far) is empty."""
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        return b""
    with fh:
        fh.seek(offset)
        return fh.read(limit)
