"""Batch arrays on one machine, with no controller: this machine's share of the task list, run and retried here.

agent.toml's ``[batch]`` names the batch spec (a staged JSON file, sha256-checked like the bundle): the command,
the task ids (and values for a map), how many machines share them, K concurrent tasks per machine, retries and
a per-task timeout. Shares are static: machine ``i`` of ``N`` runs ``ids[i::N]`` (its index comes from
agent.toml, from a machine id ending in ``m<i>``, or over ``POST /v1/batch/share``), plus any ids the client
hands it with ``POST /v1/batch/adopt`` (the unfinished share of a machine that died while the client watched).

Each task is an ordinary agent task (own log dir, own exit code, counted by the idle policy) with
``RAWVM_TASK_ID``, ``RAWVM_TASK_COUNT``, ``RAWVM_TASK_ATTEMPT`` and, for a map, ``RAWVM_TASK_VALUE``. A task's
final result (state, exit code, attempts with their agent task ids) is a line of
``state_dir/batch/results/*.jsonl`` (rawvm_agent.batch_results) and goes, with the logs of its attempts, to
the sink within a second (a directory sink) or five (http): a crash loses the running tasks and those that
ended in that last interval. A restarted agent reloads the results and runs what has none. An attempt that
printed nothing leaves no task directory (its record is its entry in the result). A queue with work left
counts as busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import aiohttp

from rawvm_agent.batch_results import ResultLog
from rawvm_agent.config import AgentConfig
from rawvm_agent.environment import Environment
from rawvm_agent.fetch import fetch, ssl_context
from rawvm_agent.install import InstallError
from rawvm_agent.state import write_json_atomic
from rawvm_agent.tasks import NotReadyError, Task, TaskError, TaskRequest, TaskState

log = logging.getLogger("rawvm_agent.batch")

SPEC_FORMAT = 1
# At most one incremental flush per this long while the queue runs: a directory sink gets only what is new
# each time (cheap, so often); an http sink (one object per flush, or one per machine) gets everything so far.
FLUSH_EVERY_S = {"dir": 1.0, "http": 5.0}
_MACHINE_INDEX = re.compile(r"(?:^|-)m(\d+)$")
DONE, FAILED = "done", "failed"


SECRETS_WAIT_S = 600.0  # how long a batch whose spec names secrets waits for them to be handed


def _cancelled(task: str, exit_code: int | None, started_at: float) -> dict[str, Any]:
    """An attempt that ended by cancellation (``exit_code`` None: it never started)."""
    code = 130 if exit_code is None else exit_code
    return {"task": task, "exit_code": code, "error": "cancelled", "started_at": started_at, "ended_at": time.time()}


class BatchError(ValueError):
    """A batch spec or request that cannot be used; one line for the log or the API caller."""


@dataclass(frozen=True)
class BatchSpec:
    argv: list[str]
    ids: list[int]
    values: list[str] | None  # a map: values[i] belongs to ids[i]
    machines: int
    tasks_per_machine: int  # 0: the machine's cores (1 with a GPU)
    max_retries: int
    task_timeout: float  # seconds; 0: none
    gpu: bool = False
    env: dict[str, str] = field(default_factory=dict)  # variables every task sees (no secrets: the spec is staged)
    secret_env: list[str] = field(default_factory=list)  # secrets' names: handed over the API (PUT /v1/env) first

    @classmethod
    def from_json(cls, raw: Any) -> BatchSpec:
        if not isinstance(raw, dict) or raw.get("format") != SPEC_FORMAT:
            raise BatchError(f"batch spec: not a format {SPEC_FORMAT} object")
        argv, ids, values = raw.get("argv"), raw.get("ids"), raw.get("values")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise BatchError("batch spec: 'argv' must be a non-empty list of strings")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
            raise BatchError("batch spec: 'ids' must be a non-empty list of integers")
        if len(set(ids)) != len(ids):
            raise BatchError("batch spec: 'ids' repeat")
        if values is not None and (
            not isinstance(values, list) or len(values) != len(ids) or not all(isinstance(v, str) for v in values)
        ):
            raise BatchError("batch spec: 'values' must be one string per id")
        numbers = {k: raw.get(k) for k in ("machines", "tasks_per_machine", "max_retries")}
        if not all(isinstance(v, int) and v >= 0 for v in numbers.values()) or numbers["machines"] == 0:
            raise BatchError("batch spec: machines (>= 1), tasks_per_machine, max_retries must be integers >= 0")
        timeout = raw.get("task_timeout", 0)
        if not isinstance(timeout, int | float) or timeout < 0:
            raise BatchError("batch spec: 'task_timeout' must be seconds >= 0")
        env, secret_env = raw.get("env") or {}, raw.get("secret_env") or []
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise BatchError("batch spec: 'env' must be an object of string values")
        if not isinstance(secret_env, list) or not all(isinstance(n, str) for n in secret_env):
            raise BatchError("batch spec: 'secret_env' must be a list of names")
        return cls(
            argv=argv,
            ids=ids,
            values=values,
            env=env,
            secret_env=secret_env,
            machines=int(raw["machines"]),
            tasks_per_machine=int(raw["tasks_per_machine"]),
            max_retries=int(raw["max_retries"]),
            task_timeout=float(timeout),
            gpu=bool(raw.get("gpu", False)),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "format": SPEC_FORMAT,
            "argv": self.argv,
            "ids": self.ids,
            "values": self.values,
            "machines": self.machines,
            "tasks_per_machine": self.tasks_per_machine,
            "max_retries": self.max_retries,
            "task_timeout": self.task_timeout,
            "gpu": self.gpu,
            **({"env": self.env} if self.env else {}),
            **({"secret_env": self.secret_env} if self.secret_env else {}),
        }

    def share(self, index: int) -> list[int]:
        return share_of(self.ids, self.machines, index)

    @cached_property
    def _values_by_id(self) -> dict[int, str]:
        return dict(zip(self.ids, self.values or [], strict=False))

    def value_of(self, bid: int) -> str | None:
        """Task ``bid``'s value (None without values), from a dict built once: ``ids.index`` per task made a
        batch with values O(n²) (10 000 ids: ~50 M comparisons)."""
        return None if self.values is None else self._values_by_id[bid]

    def concurrency(self) -> int:
        if self.tasks_per_machine:
            return self.tasks_per_machine
        return 1 if self.gpu else max(os.cpu_count() or 1, 1)


def share_of(ids: Sequence[int], machines: int, index: int) -> list[int]:
    """Machine ``index`` of ``machines`` runs every ``machines``-th id from position ``index``: even shares,
    the same on the client and on every machine, with nothing to agree on at run time."""
    return list(ids[index::machines])


class BatchRunner:
    """This machine's part of a batch; ``run`` is one background task of the agent."""

    def __init__(
        self,
        config: AgentConfig,
        state_dir: Path,
        start_task: Callable[[TaskRequest], Awaitable[Task]],
        flush: Callable[[list[Path]], Awaitable[None]],
        *,
        http_sink: Callable[[], bool] | None = None,
    ) -> None:
        self.config = config
        # Whether flushes go to an http sink: agent.toml's, or a form handed over the API after boot (aws).
        self._http_sink = http_sink or (lambda: config.sink.lower().startswith(("http://", "https://")))
        self.state_dir = state_dir
        self.dir = state_dir / "batch"
        self._start_task = start_task
        self._flush = flush
        self.spec: BatchSpec | None = None
        self.index: int | None = None
        self.error = ""
        self.results: dict[int, dict[str, Any]] = {}
        self.order: list[int] = []  # ids in the order their results came (the results API pages over it)
        self.running: dict[int, str] = {}  # batch id -> agent task id of its current attempt ("" while starting)
        self.adopted: list[int] = []
        self._attempts: dict[int, list[dict[str, Any]]] = {}
        self._wake = asyncio.Event()
        self._unflushed: list[int] = []
        self._result_log = ResultLog(self.dir / "results")
        self._unflushed_segments: list[Path] = []  # closed since the last flush: a directory sink's new ones
        self._last_flush = 0.0
        self._workers: set[asyncio.Task[None]] = set()
        self._flushing: asyncio.Task[None] | None = None
        self.stopping = False  # the agent refused a task: it is stopping, start no more
        self.cancelled = False  # cancelled on request: nothing queued starts, its ids end as cancelled
        self.env_handed = asyncio.Event()  # PUT /v1/env came: a spec's secrets are in the agent's environment

    @property
    def configured(self) -> bool:
        return bool(self.config.batch.spec_url)

    @property
    def pending(self) -> bool:
        """Work left in this machine's queue: the idle policy counts it as a running task. A machine still
        waiting for its share is not pending: with no client to give it one, it must still stop."""
        return bool(self.running) or bool(self.queue())

    def queue(self) -> list[int]:
        if self.spec is None or self.cancelled:
            return []
        mine = self.spec.share(self.index) if self.index is not None else []
        return [i for i in [*mine, *self.adopted] if i not in self.results and i not in self.running]

    # -- setup ------------------------------------------------------------------------------------------

    async def _load_spec(self) -> BatchSpec:
        target = self.dir / "spec.json"
        self.dir.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            partial = self.dir / ".spec.partial"
            connector = aiohttp.TCPConnector(ssl=ssl_context(self.config.install))
            async with aiohttp.ClientSession(connector=connector) as session:
                digest = await fetch(session, self.config.batch.spec_url, partial, lambda n: None)
            if self.config.batch.spec_sha256 and digest != self.config.batch.spec_sha256.lower():
                partial.unlink(missing_ok=True)
                raise BatchError(f"batch spec has sha256 {digest[:16]}…, agent.toml says another; refusing it")
            partial.replace(target)
        return BatchSpec.from_json(json.loads(target.read_text(encoding="utf-8")))

    def _initial_index(self, spec: BatchSpec) -> int | None:
        if self.config.batch.index >= 0:
            return self.config.batch.index
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            return int(json.loads((self.dir / "index.json").read_text())["index"])
        if spec.machines == 1:
            return 0
        if match := _MACHINE_INDEX.search(self.config.machine_id):
            return int(match.group(1))
        return None

    def _load_previous(self) -> None:
        """Results and adoptions of an earlier run of this agent (it restarted): those tasks do not run again."""
        for result in self._result_log.load():
            if result["id"] not in self.results:
                self.order.append(result["id"])
            self.results[result["id"]] = result
        with contextlib.suppress(OSError, ValueError, TypeError):
            self.adopted = [int(i) for i in json.loads((self.dir / "adopted.json").read_text())]

    # -- API --------------------------------------------------------------------------------------------

    def set_index(self, index: Any) -> None:
        """Given before the spec is loaded (the agent answers long before its install ends), it is kept."""
        if not self.configured:
            raise BatchError("no batch on this machine")
        top = self.spec.machines - 1 if self.spec is not None else None
        if not isinstance(index, int) or index < 0 or (top is not None and index > top):
            raise BatchError(f"'index' must be an integer from 0 to {top if top is not None else 'machines - 1'}")
        if self.index is not None and self.index != index:
            raise BatchError(f"this machine already has share {self.index}")
        self.index = index
        write_json_atomic(self.dir / "index.json", {"index": index})
        self._wake.set()

    def adopt(self, ids: Any) -> list[int]:
        """Take over ``ids`` (of a machine that died); returns those that were new here."""
        if self.spec is None:
            raise BatchError("no batch here (or its spec is not loaded yet)")
        known = set(self.spec.ids)
        if not isinstance(ids, list) or not all(isinstance(i, int) and i in known for i in ids):
            raise BatchError("'ids' must be a list of task ids of this batch")
        mine = set(self.spec.share(self.index)) if self.index is not None else set()
        new = [i for i in dict.fromkeys(ids) if i not in mine and i not in self.adopted]
        if new:
            self.adopted.extend(new)
            write_json_atomic(self.dir / "adopted.json", self.adopted)
            self._wake.set()
        return new

    def status(self) -> dict[str, Any]:
        spec = self.spec
        finals = [r["state"] for r in self.results.values()]
        return {
            "configured": self.configured,
            "error": self.error,
            "index": self.index,
            "machines": spec.machines if spec else 0,
            "concurrency": spec.concurrency() if spec else 0,
            "share": spec.share(self.index) if spec and self.index is not None else [],
            "adopted": list(self.adopted),
            "queued": self.queue(),
            "running": {str(k): v for k, v in self.running.items()},
            "done": finals.count(DONE),
            "failed": finals.count(FAILED),
            "results": len(self.order),
        }

    def results_after(self, after: int) -> dict[str, Any]:
        return {"results": [self.results[i] for i in self.order[after:]], "next": len(self.order)}

    # -- running ----------------------------------------------------------------------------------------

    async def run(self, ready: Awaitable[Environment | None]) -> None:
        """Wait for the environment, then keep the queue running (adopted ids may come at any time)."""
        if await ready is None:
            return
        try:
            spec = self.spec = await self._load_spec()
        except (BatchError, InstallError, OSError, ValueError) as exc:
            self.error = str(exc)
            log.error("batch: %s", exc)
            return
        self.index = self._initial_index(spec) if self.index is None else self.index
        if self.index is not None and self.index >= spec.machines:
            self.error = f"share {self.index} given, but the batch has {spec.machines} machines"
            log.error("batch: %s", self.error)
            return
        self._load_previous()
        if spec.secret_env:
            try:
                await asyncio.wait_for(self.env_handed.wait(), SECRETS_WAIT_S)
            except TimeoutError:
                self.error = f"the batch's secrets ({', '.join(spec.secret_env)}) were never handed to this machine"
                log.error("batch: %s", self.error)
                return
        log.info(
            "batch: %d tasks on %d machines, share %s, %d at a time",
            len(spec.ids),
            spec.machines,
            "unknown yet" if self.index is None else self.index,
            spec.concurrency(),
        )
        try:
            while not self.stopping:
                for bid in self.queue()[: max(spec.concurrency() - len(self.running), 0)]:
                    self.running[bid] = ""
                    worker = asyncio.create_task(self._run_task(spec, bid), name=f"batch-{bid}")
                    self._workers.add(worker)
                    worker.add_done_callback(self._workers.discard)
                if self._flushing is None or self._flushing.done():
                    # In the background: the queue keeps its slots full while files are copied or uploaded.
                    self._flushing = asyncio.create_task(self._maybe_flush(), name="batch-flush")
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), FLUSH_EVERY_S["dir"])
        finally:
            for worker in list(self._workers):
                worker.cancel()
            if self._flushing is not None:
                self._flushing.cancel()

    def _task_env(self, spec: BatchSpec, bid: int, attempt: int) -> dict[str, str]:
        env = {
            "RAWVM_TASK_ID": str(bid),
            "RAWVM_TASK_COUNT": str(len(spec.ids)),
            "RAWVM_TASK_ATTEMPT": str(attempt),
            "PYTHONUNBUFFERED": "1",
        }
        env = {**spec.env, **env}
        if spec.values is not None:
            env["RAWVM_TASK_VALUE"] = spec.value_of(bid) or ""
        return env

    async def _run_task(self, spec: BatchSpec, bid: int) -> None:
        attempts = self._attempts.setdefault(bid, [])
        try:
            while True:
                request = TaskRequest(
                    argv=spec.argv, env=self._task_env(spec, bid, len(attempts) + 1), cwd="", secret_env=[]
                )
                try:
                    task = await self._start_task(request)
                except NotReadyError:
                    self.stopping = True  # the agent is stopping: no result, so the id shows as unfinished
                    return
                except TaskError as exc:
                    now = time.time()
                    attempts.append(
                        {"task": "", "exit_code": 127, "error": str(exc), "started_at": now, "ended_at": now}
                    )
                else:
                    self.running[bid] = task.record.id
                    timed_out = await self._wait(task, spec.task_timeout)
                    record = task.record
                    if record.state == TaskState.CANCELLED or self.cancelled:
                        self.cancelled = True  # one task cancelled on request: the whole batch is
                        attempts.append(_cancelled(record.id, record.exit_code, record.started_at))
                        self._record(spec, bid, attempts)
                        return
                    if record.state != TaskState.EXITED:
                        self.stopping = True  # interrupted by the agent's stop: unfinished, not failed
                        return
                    attempts.append(
                        {
                            "task": record.id,
                            "exit_code": record.exit_code,
                            "started_at": record.started_at,
                            "ended_at": record.ended_at,
                            # 0: no log files (and no task directory) to look for
                            "output_bytes": sum(record.bytes_written.values()),
                            **({"timed_out": True} if timed_out else {}),
                        }
                    )
                if attempts[-1]["exit_code"] == 0 or len(attempts) > spec.max_retries:
                    self._record(spec, bid, attempts)
                    return
                log.info("batch: task %d failed (attempt %d), retrying", bid, len(attempts))
        finally:
            self.running.pop(bid, None)
            self._wake.set()

    def cancel(self) -> list[int]:
        """Cancel the batch here: nothing queued starts any more (each queued id ends as a failed result that
        says so); the running tasks are the caller's to cancel. The ids that will not start."""
        if self.spec is None:
            return []
        queued = self.queue()
        self.cancelled = True
        now = time.time()
        for bid in queued:
            self._record(self.spec, bid, [*self._attempts.get(bid, []), _cancelled("", None, now)])
        self._wake.set()
        return queued

    @staticmethod
    async def _wait(task: Task, timeout: float) -> bool:
        """Wait for the task to end; past ``timeout`` end its process group. True when it timed out."""
        try:
            await asyncio.wait_for(task.done.wait(), timeout or None)
            return False
        except TimeoutError:
            for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                if task.process is not None and task.process.returncode is None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(task.process.pid, sig)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(task.done.wait(), grace)
                    break
            await task.done.wait()
            return True

    def _record(self, spec: BatchSpec, bid: int, attempts: list[dict[str, Any]]) -> None:
        last = attempts[-1]
        result = {
            "id": bid,
            "value": spec.value_of(bid),
            "state": DONE if last["exit_code"] == 0 else FAILED,
            "exit_code": last["exit_code"],
            "attempts": attempts,
            "machine": self.config.machine_id,
            "ended_at": last["ended_at"],
        }
        self._result_log.append(result)
        self.results[bid] = result
        self.order.append(bid)
        self._unflushed.append(bid)
        # A line per task in the journal is a cost per task too: the ones that need a look, at info.
        level = logging.DEBUG if result["state"] == DONE and len(attempts) == 1 else logging.INFO
        log.log(level, "batch: task %d %s after %d attempt(s)", bid, result["state"], len(attempts))

    async def _maybe_flush(self) -> None:
        """Send results and their tasks' logs to the sink: every FLUSH_EVERY_S while work runs, at once when the
        queue has drained."""
        http = self._http_sink()
        every = FLUSH_EVERY_S["http" if http else "dir"]
        if not self._unflushed or (self.pending and time.monotonic() - self._last_flush < every):
            return
        # A directory sink keeps every flush, so the new results are enough; an http sink may be one object per
        # machine (a presigned PUT, qemu's) that keeps only the last flush, so it gets every result so far.
        ids = list(self.order) if http else self._unflushed
        self._unflushed = []
        if (closed := self._result_log.close_segment()) is not None:
            self._unflushed_segments.append(closed)
        segments = list(self._result_log.segments) if http else self._unflushed_segments
        self._unflushed_segments = []
        files = [self.state_dir / "state.json", self.dir / "spec.json", *segments]  # state.json: the layout's root
        for bid in ids:
            attempts = self.results[bid]["attempts"]
            files += [self.state_dir / "tasks" / a["task"] for a in attempts if a["task"] and a.get("output_bytes", 1)]
        self._last_flush = time.monotonic()
        await self._flush([f for f in files if f.exists()])

    async def close(self) -> None:
        for worker in list(self._workers):
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._result_log.close()
