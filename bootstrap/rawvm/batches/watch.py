"""Watching a batch while attached: live progress (done / running / failed / queued), the share of a machine
that dies handed to the live ones, and the summary table at the end. Progress and summary go to stderr.

The watch is a convenience, not a controller: the machines run their shares whether or not it runs.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from rawvm_agent.batch import BatchSpec
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from rawvm import sinks
from rawvm.agent.client import AgentClient, AgentError, AgentSession, agent_session
from rawvm.batches.plan import compress_ids
from rawvm.batches.results import BatchStatus, newest, sink_results
from rawvm.errors import RawvmError
from rawvm.options import TaskEnvironment
from rawvm.progress import make_progress
from rawvm.providers.base import Machine
from rawvm.session import Launched, say, wait_ready

POLL_S = 0.5
DEAD_AFTER_S = 60.0  # a machine whose agent has not answered this long is taken for dead, alive hook or not


class BatchProgress:
    """A bar with the four counts on a terminal; plain lines (on change, every few seconds) otherwise."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total, self._stream = total, stream
        self._rich: Progress | None = None
        self._task: TaskID | None = None
        self._last_line, self._last_at = "", 0.0
        if stream.isatty():
            self._rich = Progress(
                TextColumn("batch"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[counts]}"),
                TimeElapsedColumn(),
                console=Console(file=stream),
            )
            self._task = self._rich.add_task("batch", total=total, counts="")
            self._rich.start()

    @staticmethod
    def line(counts: dict[str, int]) -> str:
        return " ".join(f"{k} {counts[k]}" for k in ("done", "running", "failed", "queued"))

    def update(self, counts: dict[str, int], force: bool = False) -> None:
        text = self.line(counts)
        if self._rich is not None and self._task is not None:
            self._rich.update(self._task, completed=counts["done"] + counts["failed"], counts=text)
            return
        now = time.monotonic()
        if text != self._last_line and (force or now - self._last_at >= 2.0):
            print(f"rawvm: batch {text}", file=self._stream, flush=True)
            self._last_line, self._last_at = text, now

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()


def _clients(launched: Launched, session: AgentSession) -> dict[str, AgentClient]:
    record = launched.record
    return {m.short_id: AgentClient.for_cluster(record, m.agent_url, session=session) for m in record.machines}


def _needs_share(launched: Launched) -> bool:
    """Local machines know their share from their machine id (``m<k>``), and a lone machine has share 0; the
    others (qemu, EC2 sharing one agent.toml) get theirs over the API."""
    return launched.record.provider != "local" and len(launched.record.machines) > 1


async def hand_out_shares(launched: Launched, env: TaskEnvironment | None = None) -> None:
    """Detached: give every machine that needs one its share, and the batch's variables and secrets (``env``),
    then leave (waits only until the agents answer, not for their installs)."""
    shares = _needs_share(launched)
    if not shares and not env:
        return
    timeout = launched.provider.ready_timeout_s
    deadline = time.monotonic() + timeout
    async with agent_session() as session:
        pending = dict(enumerate(_clients(launched, session).items()))
        while pending:
            for index, (_, client) in list(pending.items()):
                try:
                    if shares and (await client.batch_status()).get("index") is None:
                        await client.batch_share(index)
                    if env:
                        await client.set_env(env.all_values(), env.secret_names)
                    del pending[index]
                except AgentError:
                    continue
            if pending and time.monotonic() > deadline:
                raise RawvmError(f"{', '.join(m for m, _ in pending.values())} never answered to take its share")
            if pending:
                await asyncio.sleep(1.0)


async def watch(
    launched: Launched, spec: BatchSpec, env: TaskEnvironment | None = None
) -> tuple[dict[int, dict[str, Any]], set[int]]:
    """Follow the round until every id has a final result, or no machine is left; (results, lost ids). Each
    machine is handed ``env`` (the batch's secrets) once it serves."""
    record, provider = launched.record, launched.provider
    async with agent_session() as session:
        clients = _clients(launched, session)
        view = make_progress(sys.stderr)
        try:
            await wait_ready(clients, provider, record, view, launched.ready_timeout_s, env)
        finally:
            view.close()
        watcher = Watcher(spec, clients, {m.short_id: m for m in record.machines}, provider.alive)
        watcher.cluster, watcher.fetch = record.name, lambda: sinks.fetch_flushes(record.name, provider)
        progress = BatchProgress(len(spec.ids), sys.stderr)
        try:
            while not watcher.finished():
                await watcher.step()
                progress.update(watcher.counts())
                if not watcher.finished():
                    await asyncio.sleep(POLL_S)
            progress.update(watcher.counts(), force=True)
        finally:
            progress.close()
    lost = {i for i in spec.ids if i not in watcher.results}
    return watcher.results, lost


class Watcher:
    """The round as the watch sees it: each machine's results, running ids and share, and the dead ones'."""

    def __init__(
        self,
        spec: BatchSpec,
        clients: dict[str, AgentClient],
        machines: dict[str, Machine],
        alive: Callable[[Machine], bool] | None,
    ) -> None:
        self.spec, self.clients, self.machines, self.alive = spec, clients, machines, alive
        self.index = {mid: i for i, mid in enumerate(clients)}
        self.owned = {mid: set(spec.share(i)) for mid, i in self.index.items()}
        self.after = dict.fromkeys(clients, 0)
        self.live = set(clients)
        self.silent_since: dict[str, float] = {}
        self.running: dict[str, set[int]] = {}  # per machine, the ids its last status said were running
        self.results: dict[int, dict[str, Any]] = {}
        self.came_from: dict[int, str] = {}  # the machine whose API gave the result
        self.orphans: set[int] = set()  # ids of dead machines not yet handed to a live one
        self.cluster = ""
        self.fetch: Callable[[], int] = lambda: 0

    def finished(self) -> bool:
        return all(i in self.results for i in self.spec.ids) or not self.live

    def counts(self) -> dict[str, int]:
        states = [r["state"] for r in self.results.values()]
        # A status and a results page are two reads: an id may have ended in between, so its result wins.
        running = len(set().union(*self.running.values()) - set(self.results))
        done, failed = states.count("done"), states.count("failed")
        return {
            "done": done,
            "failed": failed,
            "running": running,
            "queued": len(self.spec.ids) - done - failed - running,
        }

    async def _ask(self, mid: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        client = self.clients[mid]
        try:
            st = await client.batch_status()
            if st.get("error"):
                raise RawvmError(f"machine {mid}: its batch could not start: {st['error']}")
            if st.get("index") is None:
                await client.batch_share(self.index[mid])
            return st, await client.batch_results(self.after[mid])
        except AgentError:
            return None

    async def step(self) -> None:
        live = sorted(self.live)
        answers = await asyncio.gather(*(self._ask(mid) for mid in live))
        now = time.monotonic()
        for mid, answer in zip(live, answers, strict=True):
            if answer is None:
                since = self.silent_since.setdefault(mid, now)
                gone = self.alive is not None and not self.alive(self.machines[mid])
                if gone or now - since > DEAD_AFTER_S:
                    self._dead(mid)
                continue
            self.silent_since.pop(mid, None)
            st, page = answer
            for result in page["results"]:
                bid = int(result["id"])
                if newest(self.results.get(bid), result) is result:
                    self.results[bid], self.came_from[bid] = result, mid
            self.after[mid] = int(page["next"])
            self.running[mid] = {int(k) for k in dict(st.get("running", {}))}
        await self._hand_over()

    def _dead(self, mid: str) -> None:
        """A machine died: what it flushed to the sink counts; its other ids go to the live machines. A result
        seen over the API but never flushed is run again: it would be missing from the sink later, and its
        log with it."""
        self.live.discard(mid)
        self.running.pop(mid, None)
        self.fetch()
        durable = sink_results(self.cluster)
        for bid in self.owned[mid]:
            if bid in durable:
                self.results[bid] = newest(self.results.get(bid), durable[bid])
            elif self.came_from.get(bid) == mid:
                del self.results[bid]
        unfinished = {i for i in self.owned[mid] if i not in self.results}
        self.orphans |= unfinished
        self.owned[mid] = set()
        where = f"run on {', '.join(sorted(self.live))}" if self.live else "are lost: rawvm batch retry"
        say(
            f"machine {mid} is gone; its {len(unfinished)} unfinished tasks "
            f"({compress_ids(sorted(unfinished))}) {where}"
        )

    async def _hand_over(self) -> None:
        targets = sorted(self.live)
        if not self.orphans or not targets:
            return
        ordered = sorted(self.orphans)
        for k, mid in enumerate(targets):
            chunk = ordered[k :: len(targets)]
            if not chunk:
                continue
            try:
                await self.clients[mid].batch_adopt(chunk)
            except AgentError:
                continue  # it may be dying too: the next step finds out, and the ids stay orphans
            self.owned[mid] |= set(chunk)
            self.orphans -= set(chunk)


def summary(st: BatchStatus, stream: TextIO) -> None:
    """The table at the end of a run (and of ``rawvm batch status``): tasks by state, then failed and lost ids."""
    console = Console(file=stream)
    table = Table(title=f"batch {st.cluster}", box=None)
    for column in ("state", "tasks", "ids"):
        table.add_column(column)
    for state, count in st.counts().items():
        if count:
            table.add_row(state, str(count), compress_ids(st.ids(state)) if state != "done" else "")
    console.print(table)
    failed = st.ids("failed")
    if failed:
        detail = Table(box=None)
        for column in ("failed task", "exit code", "attempts", "machine"):
            detail.add_column(column)
        for bid in failed[:20]:
            result = st.results[bid]
            detail.add_row(
                str(bid),
                str(result.get("exit_code")),
                str(len(result.get("attempts", []))),
                str(result.get("machine", "")),
            )
        console.print(detail)
    if failed:
        say(
            f"{len(failed)} task{'s' if len(failed) > 1 else ''} failed for good: {compress_ids(failed)} "
            f"(output: rawvm batch logs {st.cluster} {failed[0]})"
        )
    if lost := st.ids("lost"):
        say(
            f"{len(lost)} task{'s' if len(lost) > 1 else ''} lost with their machines: {compress_ids(lost)} "
            f"(rerun them: rawvm batch retry {st.cluster})"
        )
