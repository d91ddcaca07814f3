"""``rawvm.dask_cluster(...)``: a Dask cluster on rawvm machines, as a ``distributed`` SpecCluster.

One machine runs the scheduler, the others one worker each (``rawvm.dask.procs``), all started by the agents as
tasks in the locked environment, all speaking TLS with a CA made for the cluster (``rawvm.dask.tls``). The first
launch brings up the scheduler's machine and the first workers' machines together; every later scale-up (or
adaptive step) is one more launch of all the machines it needs, reusing nothing but the cluster's certificates.

Idleness: the scheduler closes after ``keepalive`` minus a short grace with no task and no client (Dask's
``idle_timeout``, plus a preload that counts a connected client as activity); its workers end with it; then every
machine has no task and powers itself off after the grace (the agent's own keepalive). So a laptop that goes away
costs at most ``keepalive``. A retired worker's machine powers off after the grace the same way. ``close()`` stops
every machine now.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rawvm import clusters
from rawvm.agent.client import AgentClient, AgentError, AgentSession, agent_session
from rawvm.commands import down as down_cluster
from rawvm.dask.options import DaskOptions, check_environment, idle_split
from rawvm.dask.procs import (
    ARCHIVE_NAME,
    DASHBOARD_PORT,
    PEER_PORTS,
    SCHEDULER_PORT,
    SchedulerPlace,
    scheduler_command,
    scheduler_place,
    tls_archive,
    tls_env,
    worker_tasks,
)
from rawvm.dask.retire import retire_machine
from rawvm.dask.tls import TlsFiles, make_cluster_tls
from rawvm.errors import RawvmError, UsageError
from rawvm.launch import LaunchExtras, launch, lock_ahead
from rawvm.options import LaunchOptions, Lifetime
from rawvm.progress import make_progress
from rawvm.providers.base import Machine
from rawvm.session import Launched, wait_ready

try:
    from distributed.core import Status, rpc
    from distributed.deploy.spec import ProcessInterface, SpecCluster
    from distributed.security import Security
except ImportError as exc:  # the optional extra is missing: one clear line, from every entry point
    raise UsageError("Dask clusters need the 'dask' extra: pip install 'rawvm[dask]'") from exc

_START_TIMEOUT_S = 300.0  # a process's start, once its machine is ready (slow under qemu's TCG)


@dataclass
class _Slot:
    """A ready machine of one launch, waiting for (or running) Dask processes."""

    record: clusters.ClusterRecord
    machine: Machine
    client: AgentClient
    task_ids: list[str] = field(default_factory=list)


class Fleet:
    """The cluster's launches and machines, on the cluster's event loop."""

    def __init__(self, options: DaskOptions, directory: Path) -> None:
        self.options = options
        self.directory = directory  # 0700: the client's key and the TLS archive
        self.tls: TlsFiles = make_cluster_tls(options.name, directory / "tls")
        self.archive = tls_archive(self.tls, directory / ARCHIVE_NAME)
        self.security = Security(
            tls_ca_file=str(self.tls.ca),
            tls_client_cert=str(self.tls.client_cert),
            tls_client_key=str(self.tls.client_key),
            require_encryption=True,
        )
        self.idle_timeout_s, self.grace_s = idle_split(options.launch.lifetime.keepalive_s)
        self.records: list[clusters.ClusterRecord] = []
        self.place: SchedulerPlace | None = None
        self.scheduler_slot: _Slot | None = None
        self.pool: list[_Slot] = []
        self.dask_cuda = False
        self._session: AgentSession | None = None
        self._pinged: list[_Slot] = []  # machines not yet running Dask: keepalive pings hold them up
        self._pinger: asyncio.Task[None] | None = None
        self._waiting: list[asyncio.Future[_Slot]] = []
        self._batch: asyncio.Task[None] | None = None
        self._launches = 0
        self.bundle: Path | None = None  # the workers' locked bundle (``lock``)

    # -- launches ----------------------------------------------------------------------------------------------

    def _launch_name(self) -> str:
        self._launches += 1
        return self.options.name if self._launches == 1 else f"{self.options.name}-{self._launches}"

    def _check(self, bundle_dir: Path) -> None:
        self.dask_cuda = check_environment(bundle_dir)

    def lock(self) -> None:
        """Lock the workers' environment once, into the cluster's directory, and check it has Dask: a bad
        environment stops the cluster before its event loop or any machine starts, and every later launch of
        worker machines (``scale`` up) uses this bundle instead of locking again."""
        bundle = lock_ahead(self.options.launch, self.directory / "bundle")
        self._check(bundle)
        self.bundle = bundle

    def _launch_sync(self, count: int, vm_type: str, name: str) -> Launched:
        if self.bundle is None:
            self.lock()
        o = self.options.launch
        if not vm_type or vm_type == o.request.vm_type:  # the workers' kind of machine: their bundle fits
            o = o.replace(environment=dataclasses.replace(o.environment, bundle_cache=self.bundle))
        # Machines idle off after the grace alone: Dask's own idle_timeout has already said the cluster is idle.
        lifetime = Lifetime(keepalive_s=float(round(self.grace_s)), max_lifetime_s=o.lifetime.max_lifetime_s)
        options = o.replace(request=o.request.of_type(vm_type, count), lifetime=lifetime, cluster=name)
        extras = LaunchExtras(
            extra_code=((ARCHIVE_NAME, self.archive),),
            open_ports=(SCHEDULER_PORT, DASHBOARD_PORT),
            peer_ports=PEER_PORTS,
            client_timeout=self.grace_s,
            check_bundle=self._check,
        )
        return launch(options, extras)

    async def _launch(self, count: int, vm_type: str = "") -> list[_Slot]:
        """One launch of ``count`` machines, returned once every one is ready (held up by keepalive pings)."""
        if self._session is None:
            self._session = agent_session()
        launched = await asyncio.to_thread(self._launch_sync, count, vm_type, self._launch_name())
        record = launched.record
        self.records.append(record)
        slots = [
            _Slot(record, m, AgentClient.for_cluster(record, m.agent_url, session=self._session))
            for m in record.machines
        ]
        self._hold(slots)
        view = make_progress(sys.stderr)
        try:
            env = self.options.launch.task_env  # the scheduler's and workers' processes see it
            await wait_ready({s.machine.short_id: s.client for s in slots}, launched.provider, record, view, env=env)
        finally:
            view.close()
        return slots

    def _hold(self, slots: Sequence[_Slot]) -> None:
        self._pinged.extend(slots)
        if self._pinger is None:
            self._pinger = asyncio.ensure_future(self._ping())

    async def _ping(self) -> None:
        while True:
            for slot in list(self._pinged):
                if slot.task_ids:
                    self._pinged.remove(slot)
                    continue
                with contextlib.suppress(AgentError):
                    await slot.client.keepalive()
            await asyncio.sleep(max(1.0, self.grace_s / 3))

    async def start(self, workers: int) -> SchedulerPlace:
        """The first launch: the scheduler's machine and the first ``workers`` machines, then the scheduler."""
        o = self.options
        own_type = bool(o.scheduler_vm_type) and o.scheduler_vm_type != o.launch.request.vm_type
        if not o.dedicated_scheduler:
            slots = await self._launch(max(1, workers))
            self.scheduler_slot, self.pool = slots[0], slots
        elif own_type:
            scheduler, pool = await asyncio.gather(
                self._launch(1, o.scheduler_vm_type), self._launch(workers) if workers else _no_slots()
            )
            self.scheduler_slot, self.pool = scheduler[0], pool
        else:
            slots = await self._launch(workers + 1)
            self.scheduler_slot, self.pool = slots[0], slots[1:]
        return await self._start_scheduler(self.scheduler_slot)

    async def _start_scheduler(self, slot: _Slot) -> SchedulerPlace:
        from rawvm.providers.local import free_port

        if self.options.provider == "local":
            place = scheduler_place("local", slot.machine, free_port(), free_port())
        else:
            place = scheduler_place(self.options.provider, slot.machine)
        slot.task_ids.append(await slot.client.submit(scheduler_command(place, self.idle_timeout_s), env=tls_env()))
        self.place = place
        await self._await_scheduler(slot, place)
        return place

    async def _await_scheduler(self, slot: _Slot, place: SchedulerPlace) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        probe = rpc(place.client_address, connection_args=self.security.get_connection_args("client"), timeout=5)
        try:
            while True:
                try:
                    await asyncio.wait_for(probe.identity(), 10)
                    return
                # Not listening yet. Behind qemu's port forward the TCP connect succeeds and the guest then drops
                # it, which tornado reports as "IOStream is not idle; cannot convert to SSL" (ValueError).
                except (OSError, TimeoutError, ValueError):
                    pass
                await self._raise_if_ended(slot, slot.task_ids[-1], "the Dask scheduler")
                if time.monotonic() > deadline:
                    raise RawvmError(f"the Dask scheduler on {slot.machine.id} did not answer in time")
                await asyncio.sleep(0.5)
        finally:
            await probe.close_rpc()

    async def _raise_if_ended(self, slot: _Slot, task_id: str, what: str) -> None:
        task = await slot.client.task(task_id)
        if task.get("state") != "running":
            data, _ = await slot.client.logs(task_id, stream="stderr")
            lines = [line for line in data.decode(errors="replace").splitlines() if line.strip()]
            tail = lines[-1].strip() if lines else f"exit code {task.get('exit_code')}"
            raise RawvmError(f"{what} on {slot.machine.id} ended at once: {tail} (see 'rawvm logs {slot.record.name}')")

    async def worker_slot(self) -> _Slot:
        """A ready machine for one more worker: from the first launch, or from one launch for every worker asked
        for at about the same time (``scale(n)`` asks for all of its new workers together)."""
        if self.pool:
            return self.pool.pop(0)
        future: asyncio.Future[_Slot] = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        if self._batch is None:
            self._batch = asyncio.ensure_future(self._launch_batch())
        return await future

    async def _launch_batch(self) -> None:
        await asyncio.sleep(0.2)  # every worker object of one scale() starts within this
        waiting, self._waiting, self._batch = self._waiting, [], None
        try:
            slots = await self._launch(len(waiting))
        except BaseException as exc:
            for future in waiting:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else RawvmError("launch cancelled"))
            return
        for future, slot in zip(waiting, slots, strict=True):
            if future.done():  # its worker was cancelled meanwhile: unheld, the machine powers off unused
                with contextlib.suppress(ValueError):
                    self._pinged.remove(slot)
            else:
                future.set_result(slot)

    async def start_worker(self, slot: _Slot, name: str, scheduler: Any) -> list[str]:
        """Start ``name``'s worker processes on ``slot``; returns once each has joined the scheduler."""
        assert self.place is not None
        status = await slot.client.status()
        gpus = int(status.get("gpu_count") or 0)
        cores = 0
        with contextlib.suppress(AgentError, TypeError, ValueError, IndexError, AttributeError):
            cores = int((await slot.client.samples())[0]["cpu"]["cores"])
        tasks = worker_tasks(
            name,
            self.place,
            cores=cores,
            gpus=gpus,
            dask_cuda=self.dask_cuda,
            fixed_ports=self.options.provider != "local",
        )
        for task in tasks:
            slot.task_ids.append(await slot.client.submit(task.argv, env=task.env))
        names = [t.name for t in tasks]
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            info = await scheduler.identity()
            joined = {str(w.get("name")) for w in info.get("workers", {}).values()}
            if all(n in joined for n in names):
                return names
            for task_id in slot.task_ids[-len(tasks) :]:
                await self._raise_if_ended(slot, task_id, f"Dask worker {name}")
            if time.monotonic() > deadline:
                raise RawvmError(f"Dask worker {name} on {slot.machine.id} did not join the scheduler in time")
            await asyncio.sleep(0.5)

    # -- the end ------------------------------------------------------------------------------------------------

    async def retire(self, slot: _Slot, names: Sequence[str]) -> None:
        """Retire one machine's workers and stop it, unless it also runs the scheduler (``rawvm.dask.retire``)."""
        address = self.place.client_address if self.place else ""
        client = None if slot is self.scheduler_slot else slot.client
        await retire_machine(address, self.security.get_connection_args("client"), names, client)

    async def close(self) -> None:
        """Stop every machine of every launch now, and forget the cluster's keys."""
        if self._pinger is not None:
            self._pinger.cancel()
        for record in self.records:
            with contextlib.suppress(RawvmError):
                await asyncio.to_thread(down_cluster, record.name)
        if self._session is not None:
            await self._session.close()
            self._session = None
        shutil.rmtree(self.directory, ignore_errors=True)


async def _no_slots() -> list[_Slot]:
    return []


class RawvmScheduler(ProcessInterface):
    """The scheduler as SpecCluster sees it: started by the first launch."""

    def __init__(self, fleet: Fleet, workers: int) -> None:
        super().__init__()
        self.fleet, self.workers = fleet, workers

    async def start(self) -> None:
        place = await self.fleet.start(self.workers)
        self.address = place.client_address
        await super().start()


class RawvmWorker(ProcessInterface):
    """One worker machine. Closing it (``scale`` down) retires its workers by name and stops the machine
    (``rawvm.dask.retire``); at the cluster's own close, ``Fleet.close`` stops every machine at once instead."""

    def __init__(self, scheduler: str, *, fleet: Fleet, name: str) -> None:
        super().__init__()
        self.fleet, self.name = fleet, str(name)
        self.slot: _Slot | None = None
        self.names: list[str] = []  # its Dask workers' names (one per GPU on a GPU machine)

    async def start(self) -> None:
        self.slot = await self.fleet.worker_slot()
        probe = rpc(
            self.fleet.place.client_address if self.fleet.place else "",
            connection_args=self.fleet.security.get_connection_args("client"),
        )
        try:
            self.names = await self.fleet.start_worker(self.slot, self.name, probe)
        finally:
            await probe.close_rpc()
        await super().start()

    async def close(self) -> None:
        owner = getattr(self, "_cluster", None)  # SpecCluster's weak reference, set once the worker started
        cluster = owner() if owner is not None else None
        if self.slot is not None and cluster is not None and cluster.status == Status.running:
            await self.fleet.retire(self.slot, self.names)
        await super().close()


class RawvmCluster(SpecCluster):
    """A Dask cluster on rawvm machines; see ``rawvm.dask_cluster``."""

    def __init__(self, options: DaskOptions, n: int, *, asynchronous: bool = False, shutdown_on_close: bool = True):
        directory = clusters.state_dir() / "dask" / options.name
        if directory.exists():
            raise UsageError(f"a Dask cluster named {options.name!r} exists: pick another name or 'rawvm dask down'")
        directory.mkdir(parents=True, mode=0o700)
        self.fleet = Fleet(options, directory)
        self.options = options
        worker = {"cls": RawvmWorker, "options": {"fleet": self.fleet}}
        try:
            if not asynchronous:  # an async caller's loop is not blocked: its first launch locks, in a thread
                self.fleet.lock()
            super().__init__(
                workers={f"w{i}": worker for i in range(n)},
                scheduler={"cls": RawvmScheduler, "options": {"fleet": self.fleet, "workers": n}},
                worker=worker,
                security=self.fleet.security,
                asynchronous=asynchronous,
                name=options.name,
                shutdown_on_close=shutdown_on_close,
            )
        except BaseException as exc:
            if not asynchronous:
                with contextlib.suppress(Exception):
                    self._loop_runner.stop()
                with contextlib.suppress(Exception):
                    self._stop_machines_sync()
            cause = exc.__cause__ if isinstance(exc, RuntimeError) else None
            if isinstance(cause, RawvmError):  # SpecCluster wraps start errors: the user gets rawvm's one line
                raise cause from None
            raise

    def _new_worker_name(self, worker_number: int) -> str:
        return f"w{worker_number}"

    def _stop_machines_sync(self) -> None:
        for record in self.fleet.records:
            with contextlib.suppress(RawvmError):
                down_cluster(record.name)
        shutil.rmtree(self.fleet.directory, ignore_errors=True)

    @property
    def dashboard_link(self) -> str:
        return self.fleet.place.dashboard_link if self.fleet.place else ""

    async def _close(self) -> None:
        if self.status == Status.closed:
            return
        try:
            await super()._close()
        finally:
            await self.fleet.close()

    def save(self) -> Path:
        """Note how to reach the cluster (``rawvm dask up``): its address, its launches, its client certificates."""
        place = self.fleet.place
        record = {
            "name": self.options.name,
            "provider": self.options.provider,
            "scheduler_address": place.client_address if place else "",
            "dashboard_link": self.dashboard_link,
            "launches": [r.name for r in self.fleet.records],
        }
        path = self.fleet.directory / "cluster.json"
        path.write_text(json.dumps(record, indent=2, sort_keys=True))
        return path


def make_cluster(
    n: int,
    launch_options: LaunchOptions,
    *,
    name: str | None = None,
    scheduler_vm_type: str = "",
    dedicated_scheduler: bool = True,
    asynchronous: bool = False,
    shutdown_on_close: bool = True,
) -> RawvmCluster:
    """The cluster ``rawvm.dask_cluster`` describes: ``n`` worker machines plus one for the scheduler
    (``dedicated_scheduler=False``: the scheduler shares the first worker's machine)."""
    if n < 0 or (n == 0 and not dedicated_scheduler):
        raise UsageError(f"n={n}: the number of worker machines must be at least 0 (1 with a shared scheduler)")
    idle_split(launch_options.lifetime.keepalive_s)
    if launch_options.request.provider == "qemu" and (dedicated_scheduler or n != 1):
        raise UsageError(
            "a qemu Dask cluster is one VM (VMs behind qemu's user networking cannot reach each other): "
            "use n=1, dedicated_scheduler=False"
        )
    options = DaskOptions(
        name=clusters.check_name(name) if name else clusters.new_name(),
        launch=launch_options,
        scheduler_vm_type=scheduler_vm_type,
        dedicated_scheduler=dedicated_scheduler,
    )
    return RawvmCluster(options, n, asynchronous=asynchronous, shutdown_on_close=shutdown_on_close)


def saved_security(name: str) -> tuple[str, Security]:
    """The scheduler address and the client's TLS settings of a cluster from ``rawvm dask up``."""
    directory = clusters.state_dir() / "dask" / clusters.check_name(name)
    try:
        record = json.loads((directory / "cluster.json").read_text())
    except (OSError, ValueError):
        raise UsageError(f"no Dask cluster named {name!r} on this machine (see 'rawvm ls')") from None
    tls = TlsFiles(directory / "tls")
    security = Security(
        tls_ca_file=str(tls.ca),
        tls_client_cert=str(tls.client_cert),
        tls_client_key=str(tls.client_key),
        require_encryption=True,
    )
    return str(record["scheduler_address"]), security


def connect(name: str) -> Any:
    """A ``distributed.Client`` of the cluster ``rawvm dask up`` started."""
    from distributed import Client

    address, security = saved_security(name)
    return Client(address, security=security)


def down(name: str) -> int:
    """Stop every machine of the Dask cluster ``name`` (all its launches) now; returns how many were running."""
    directory = clusters.state_dir() / "dask" / clusters.check_name(name)
    try:
        launches = list(json.loads((directory / "cluster.json").read_text())["launches"])
    except (OSError, ValueError, KeyError):
        raise UsageError(f"no Dask cluster named {name!r} on this machine (see 'rawvm ls')") from None
    stopped = 0
    for launched in launches:
        if clusters.exists(launched):
            stopped += down_cluster(launched)
    shutil.rmtree(directory, ignore_errors=True)
    return stopped
