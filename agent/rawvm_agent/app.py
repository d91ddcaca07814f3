"""The agent: wires install, tasks, telemetry, the idle policy, the spot watcher and the stop sequence.

One ``Agent`` per process. ``server.create_app`` puts the HTTP API (api.py, calls_api.py, batch_api.py) in front
of it; ``server.serve`` runs both until the agent has stopped (power-off action done) or the process is told to
exit. The route handlers find the Agent under ``AGENT_KEY``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from rawvm_agent import __version__, agent_metrics, idle, sdnotify, sink, sink_post, spot, stopper
from rawvm_agent.batch import BatchRunner
from rawvm_agent.boot_phases import BootPhases
from rawvm_agent.calls import CallHub
from rawvm_agent.config import AgentConfig
from rawvm_agent.environment import Environment
from rawvm_agent.install import InstallError
from rawvm_agent.installer import Installer
from rawvm_agent.logs import Redactor, url_password
from rawvm_agent.prefetch import PREFETCH_DIR, BundlePrefetch
from rawvm_agent.presence import Presence
from rawvm_agent.state import SERVING, AgentState, InstallProgress, Phase, StateStore
from rawvm_agent.tasks import NotReadyError, Task, TaskManager, TaskRequest
from rawvm_agent.telemetry import Sampler

log = logging.getLogger("rawvm_agent")

AGENT_KEY: web.AppKey[Agent] = web.AppKey("agent")  # where server.create_app puts the Agent for the route modules
SINK_TIMEOUT_S = 300.0
STATE_SAVE_EVERY_S = 5.0
# Directories of the state dir that are not worth sending to the sink (big, and rebuilt from the bundle).
STATUS_WAIT_MAX_S = 10.0  # the longest GET /v1/status?wait= holds its answer
NOT_FLUSHED = frozenset(
    {"bundle", "bundle.partial", PREFETCH_DIR, "env", "work", "conda", "conda-cache", "ca-bundle.pem"}
)


def boot_id() -> str:
    """The kernel's id of this boot: tells "the agent restarted" from "the machine was started again"."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        prefetch: BundlePrefetch | None = None,
    ) -> None:
        self.config = config
        self.environ = dict(os.environ if environ is None else environ)
        self.clock = clock
        self.state_dir = Path(config.state_dir)
        # Logs and task output may hold what users did not mark secret: root only.
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.token_sha256 = config.token_digest()  # the agent keeps only the token's hash (auth.py)
        self.redactor = Redactor([config.token])  # the token itself only when a hand-run agent.toml holds it
        self.redactor.add(*(self.environ[n] for n in config.secret_env if self.environ.get(n)))
        self.redactor.add(*map(url_password, (config.install.index_url, *config.install.extra_index_urls)))
        # An S3 presigned POST's signature, policy and session token: as good as a credential until they expire.
        self.redactor.add(*sink_post.secret_values(config.sink_form))
        self.handed_sink = sink_post.load(self.state_dir)  # a form handed over the API before a restart
        if self.handed_sink is not None:
            self.redactor.add(*sink_post.secret_values(self.handed_sink.fields))
        self.log_file = self.state_dir / "agent.log"
        self.store = StateStore(self.state_dir / "state.json")
        self.state = AgentState()
        self.boot_id = boot_id()
        self.sampler = Sampler(config.telemetry, self.state_dir)
        self.tasks = TaskManager(
            config.tasks,
            self.state_dir / "tasks",
            self.redactor,
            secret_env_names=config.secret_env,
            on_change=self._on_tasks_change,
        )
        self.calls = CallHub(self)  # @rawvm.function calls and their workers (calls.py)
        self.redactor.add(self.calls.worker_token)
        self.people = Presence(self._on_tasks_change)  # open shells, forwards, copies (presence.py)
        self.boot_phases = BootPhases(self.state_dir)
        self.installer = Installer(
            config, self.state_dir, self.state.install, self.redactor, self._install_progress, prefetch=prefetch
        )
        self.batch = BatchRunner(
            config, self.state_dir, self._start_batch_task, self._flush_files, http_sink=self.http_sink
        )
        self.env: Environment | None = None
        self.policy: idle.IdlePolicy | None = None
        self.decision: idle.IdleDecision | None = None
        self.warnings: list[str] = []
        self.stopped = asyncio.Event()  # the stop sequence ran to the end (power-off action done)
        self.exit_code = 0
        self._stop_task: asyncio.Task[None] | None = None
        self._background: list[asyncio.Task[Any]] = []
        self._last_save = 0.0
        self._save_error = ""
        self._phase_changed = asyncio.Event()  # set, and replaced, at each phase change (``status_after``)

    # -- lifecycle --------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Resume or begin: restore state, start telemetry, install (unless done), start the loops."""
        now = self.clock()
        self.boot_phases.mark("agent_up", now)
        previous = self.store.load()
        if self.store.damage:
            log.warning("state file %s is damaged (%s); starting over", self.store.path, self.store.damage[:200])
        resumed_stop = False
        if previous is None:
            self.state.started_at = now
            self.state.enter(Phase.BOOTING, now)
        else:
            self.state = previous
            self.state.restarts += 1
            same_boot = self.state.boot_id == self.boot_id
            resumed_stop = same_boot and self.state.phase in (Phase.STOPPING, Phase.OFF)
            if not same_boot:
                # The machine itself was started again: a new lifetime and a fresh idle clock.
                self.state.started_at, self.state.idle, self.state.last_keepalive = now, {}, None
                self.state.stop_reason = ""
                if self.state.phase == Phase.FAILED:  # a new boot gets a new try (the network may be back)
                    self.state.error = ""
                    self.state.enter(Phase.BOOTING, now)
        self.installer.progress = self.state.install
        self.policy = self._restore_policy()
        log.info(
            "rawvm-agent %s starting (phase %s, restart %d) on %s:%d",
            __version__,
            self.state.phase,
            self.state.restarts,
            self.config.bind,
            self.config.port,
        )
        self.save_state()
        try:
            await self.sampler.start()
        except Exception:
            # Telemetry is worth having, not worth a machine that never stops: go on without it.
            log.exception("telemetry failed to start; running without samples")
        if resumed_stop:
            log.warning("resuming an interrupted stop (%s)", self.state.stop_reason or "unknown reason")
            self.request_stop(self.state.stop_reason or "resumed stop")
        else:
            install = self._spawn(self._install(), "install")
            if self.batch.configured:
                self._spawn(self.batch.run(self._env_after(install)), "batch")
            self._spawn(self._idle_loop(), "idle")
            if self.config.spot.enabled:
                self._spawn(spot.watch_spot(self.config.spot, self._on_spot_notice), "spot")
        # Fed from this event loop: a hung loop stops feeding and systemd restarts the agent.
        self._spawn(sdnotify.feed_watchdog(), "watchdog")

    def _restore_policy(self) -> idle.IdlePolicy:
        if self.state.idle:
            try:
                return idle.IdlePolicy.from_state(self.config.idle, self.state.idle)
            except (KeyError, TypeError, ValueError):
                log.warning("idle clock in the state file is unreadable; starting it over")
        return idle.IdlePolicy(self.config.idle, self.state.started_at)

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        task.add_done_callback(self._background_done)
        self._background.append(task)
        return task

    async def _env_after(self, install: asyncio.Future[Any]) -> Environment | None:
        await asyncio.wait([install])
        return self.env

    async def _start_batch_task(self, request: TaskRequest) -> Task:
        if self._stop_task is not None or self.env is None:
            raise NotReadyError(f"the agent is {self.state.phase}; no new tasks")
        return await self.tasks.start(request, self.env, self.environ, own_record=False)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("agent loop %r failed: %s", task.get_name(), exc, exc_info=exc)

    async def close(self) -> None:
        """Leave without powering off (the process is being stopped or restarted): save, stop children."""
        self.calls.close()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._stop_task is not None and not self._stop_task.done():
            self._stop_task.cancel()
            await asyncio.gather(self._stop_task, return_exceptions=True)
        await self.batch.close()
        await self.tasks.close()
        with contextlib.suppress(Exception):
            await self.sampler.stop()
        self.save_state()

    def save_state(self) -> None:
        """Persist the state; a full or failing disk is logged, never raised: the machine must still stop."""
        self.state.boot_id = self.boot_id
        if self.policy is not None:
            self.state.idle = self.policy.to_state()
        self._last_save = self.clock()
        try:
            self.store.save(self.state)
        except OSError as exc:
            if str(exc) != self._save_error:
                log.error("cannot save %s (%s); going on without it", self.store.path, exc)
            self._save_error = str(exc)
        else:
            self._save_error = ""

    def set_phase(self, phase: Phase) -> None:
        if self.state.phase == phase:
            return
        log.info("phase %s -> %s", self.state.phase, phase)
        self.state.enter(phase, self.clock())
        self.save_state()
        self._phase_changed.set()
        self._phase_changed = asyncio.Event()
        sdnotify.notify(sdnotify.status(f"rawvm-agent: {phase}"))

    # -- install ----------------------------------------------------------------------------------------

    def _install_progress(self) -> None:
        step = self.installer.progress.step
        if step in ("uv", "conda", "venv"):  # the steps after every bundle file was verified
            self.boot_phases.mark("bundle_downloaded", self.clock())
        if step in ("conda", "venv"):  # after the wait for uv, if there was one
            self.boot_phases.mark("uv_ready", self.clock())
        self.save_state()

    async def _install(self) -> None:
        if self.state.phase == Phase.FAILED:
            log.warning("install failed before this restart (%s); not retrying", self.state.error)
            return
        if self.installer.is_installed(self.state.installed_manifest):
            self.env = self.installer.existing()
            if self.state.phase not in SERVING:
                self.set_phase(Phase.READY)
            log.info("environment already installed; resuming")
            return
        self.state.install = self.installer.progress = InstallProgress()  # an earlier attempt's counts are stale
        if self.config.bundle.files:
            self.set_phase(Phase.INSTALLING)
        try:
            self.env = await self.installer.install()
        except InstallError as exc:
            self.state.error = str(exc)
            log.error("install failed: %s", exc)
            self.set_phase(Phase.FAILED)
            return
        except Exception as exc:
            # Any other error must still end in FAILED: "installing" counts as busy, and a machine stuck there
            # would run until max_lifetime.
            self.state.error = f"{type(exc).__name__}: {exc}"
            log.exception("install failed unexpectedly")
            self.set_phase(Phase.FAILED)
            return
        self.state.installed_manifest = self.config.bundle.manifest_sha256 if self.config.bundle.files else "-"
        self.state.error = ""
        log.info("environment ready")
        self.boot_phases.mark("environment_installed", self.clock())
        self.set_phase(Phase.READY)

    # -- idle -------------------------------------------------------------------------------------------

    async def _idle_loop(self) -> None:
        period = max(self.config.telemetry.interval, 0.1)
        while self._stop_task is None:
            try:
                self.tick()
            except Exception:
                # This loop is what powers the machine off: a bad tick is logged, the loop goes on.
                log.exception("idle check failed; trying again next period")
            await asyncio.sleep(period)

    def tick(self) -> None:
        """One look at activity: update busy/idle, and start the stop sequence when the policy says so."""
        assert self.policy is not None
        now = self.clock()
        # The readings since the last look, not over the idle window: the policy keeps the window itself, and a
        # window-long mean fed into a window-long look-back would delay idleness by up to twice the window.
        recent = max(self.config.telemetry.interval, 0.1)
        self.decision = self.policy.observe(
            now,
            # Installing is work too: a slow download must not look like an idle machine.
            task_running=self.calls.tasks_busy()
            or self.batch.pending  # a batch queue with work left is not idle, even between two tasks
            or self.people.busy()  # someone at a shell, a forwarded port or a copy
            or self.state.phase in (Phase.BOOTING, Phase.INSTALLING),
            cpu_percent=self.sampler.cpu_percent(recent),
            gpu_percents=self.sampler.gpu_utilization(recent),
            last_keepalive=self.state.last_keepalive,
        )
        if self.state.phase in SERVING:
            self.set_phase(Phase.IDLE if self.decision.idle else Phase.BUSY)
        if now - self._last_save >= STATE_SAVE_EVERY_S:
            self.save_state()
        if self.decision.stop:
            if self.decision.forced:
                log.warning("stopping although busy: %s", self.decision.reason)
            self.request_stop(self.decision.reason or "idle")

    @property
    def stopping(self) -> bool:
        return self._stop_task is not None

    def keepalive(self) -> None:
        self.state.last_keepalive = self.clock()

    def _on_tasks_change(self) -> None:
        # A task starting or ending changes busy/idle at once, not a sample period later.
        if self.policy is not None and self._stop_task is None:
            try:
                self.tick()
            except Exception:
                log.exception("idle check failed; the idle loop will try again")

    async def _on_spot_notice(self, action: str) -> None:
        self.request_stop(f"spot interruption: {' '.join(action.split())}")

    # -- stop -------------------------------------------------------------------------------------------

    def request_stop(self, reason: str) -> asyncio.Task[None]:
        """Start the stop sequence once; later calls return the same sequence."""
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._stop_sequence(reason))
        return self._stop_task

    async def _stop_sequence(self, reason: str) -> None:
        log.warning("stopping: %s", reason)
        self.state.stop_reason = reason
        self.set_phase(Phase.STOPPING)
        try:
            await self.tasks.interrupt_all()
            with contextlib.suppress(Exception):
                await self.sampler.stop()
            await self._flush_to_sink()
        finally:
            self.set_phase(Phase.OFF)
            log.warning("power-off action now (%s)", reason)
            try:
                await stopper.power_off(self.config.idle)
            except Exception as exc:
                # Exit non-zero: systemd restarts the agent, which resumes the stop; when restarts run
                # out, OnFailure= powers the machine off.
                log.error("power-off action failed: %s", exc)
                self.exit_code = 1
            self.stopped.set()

    def sink_files(self) -> list[Path]:
        files = []
        for path in sorted(self.state_dir.rglob("*")):
            rel = path.relative_to(self.state_dir)
            if rel.parts[0] in NOT_FLUSHED or not path.is_file() or path.name.startswith("."):
                continue
            files.append(path)
        return files

    def sink_label(self) -> str:
        """Names this machine's flush. Every EC2 machine of a cluster gets the same agent.toml (one launch
        template), so without a machine_id the host name tells them apart (unique in a VPC)."""
        machine = self.config.machine_id or socket.gethostname()
        return "-".join(p for p in (self.config.cluster, machine) if p) or "machine"

    def sink_target(self) -> tuple[str, dict[str, str]]:
        """Where flushes go, and the form fields of a POST: the form the laptop handed over the API (aws: this
        machine's own presigned POST), else agent.toml's sink. ("", {}): nowhere, logs stay on the disk."""
        if self.handed_sink is not None:
            return self.handed_sink.url, self.handed_sink.fields
        return self.config.sink, self.config.sink_form

    def http_sink(self) -> bool:
        return self.sink_target()[0].lower().startswith(("http://", "https://"))

    def hand_sink(self, body: Any) -> None:
        """``PUT /v1/sink``: keep this machine's own sink upload (``sink_post``); SinkPostError when it is not one.
        Its signing values join the Redactor before anything could log them."""
        handed = sink_post.parse(body)
        self.redactor.add(*sink_post.secret_values(handed.fields))
        sink_post.save(self.state_dir, handed)
        self.handed_sink = handed
        log.info("sink: this machine's upload form was handed over the API (%d fields)", len(handed.fields))

    async def _flush_files(self, files: list[Path]) -> None:
        """An incremental flush (batch results so far); the stop sequence still flushes everything."""
        url, form = self.sink_target()
        if url:
            await sink.flush(url, files, label=self.sink_label(), timeout=SINK_TIMEOUT_S, form=form)

    async def _flush_to_sink(self) -> None:
        url, form = self.sink_target()
        if not url:
            log.info("no sink configured (nor handed over the API); logs and telemetry stay on the disk")
            return
        self.save_state()
        files = self.sink_files()
        log.info("flushing %d files to the sink", len(files))
        try:
            await sink.flush(url, files, label=self.sink_label(), timeout=SINK_TIMEOUT_S, form=form)
        except Exception as exc:
            # The machine must stop even when the sink is unreachable: billing beats log shipping.
            log.error("flush to the sink failed: %s", exc or type(exc).__name__)

    # -- API helpers ------------------------------------------------------------------------------------

    async def start_task(self, body: Any) -> dict[str, Any]:
        if self._stop_task is not None:
            raise NotReadyError(f"the agent is {self.state.phase}; no new tasks")
        if self.state.phase not in SERVING or self.env is None:
            detail = f": {self.state.error}" if self.state.error else ""
            raise NotReadyError(f"the environment is not ready (phase {self.state.phase}{detail})")
        task = await self.tasks.start(TaskRequest.from_json(body), self.env, self.environ)
        return {"id": task.record.id}

    def _boot_phases(self) -> dict[str, float]:
        if self.tasks.first_started_at is not None:
            self.boot_phases.mark("first_task_started", self.tasks.first_started_at)
        return self.boot_phases.as_dict()

    async def status_after(self, phase: str, wait: float) -> dict[str, Any]:
        """``status()`` once the phase is no longer ``phase``, or after ``wait`` seconds (at most
        STATUS_WAIT_MAX_S): a client waiting for a machine to be ready asks once a second, not four times, and
        still hears of the change at once (issue 22: on a small machine each answer costs the install CPU)."""
        if wait > 0 and self.state.phase.value == phase:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._phase_changed.wait(), min(wait, STATUS_WAIT_MAX_S))
        return self.status()

    def status(self) -> dict[str, Any]:
        now = self.clock()
        decision = self.decision
        idle_since = decision.idle_since if decision else None
        return {
            "version": __version__,
            "cluster": self.config.cluster,
            "machine_id": self.config.machine_id,
            "phase": self.state.phase.value,
            "phase_times": dict(self.state.phase_times),
            "boot_phases": self._boot_phases(),
            "started_at": self.state.started_at,
            "restarts": self.state.restarts,
            "error": self.state.error,
            "stop_reason": self.state.stop_reason,
            "install": {**vars(self.state.install)},
            "idle": {
                "idle": bool(decision and decision.idle),
                "idle_since": idle_since,
                "idle_seconds": (now - idle_since) if idle_since else 0.0,
                "keepalive_s": self.config.idle.keepalive,
                "stops_at": (idle_since + self.config.idle.keepalive) if idle_since else None,
                "reason": decision.reason if decision else "",
                "last_keepalive": self.state.last_keepalive,
                "max_lifetime_at": self.state.started_at + self.config.idle.max_lifetime,
            },
            # A count, not the ids: a status read (each second from rawvm top, held reads while the laptop waits)
            # would carry every task a big batch ever ran; GET /v1/tasks lists them.
            "tasks": {**self.tasks.counts(), "total": len(self.tasks.tasks)},
            "sessions": self.people.counts(),
            "warnings": [*self.warnings, *self.tasks.warnings()],
            "gpu_count": self.sampler.gpu_count,
            "gpus": self._latest_gpus(),
        }

    def _latest_gpus(self) -> list[Any]:
        """Per-GPU readings of the newest telemetry sample (utilization, memory, power, …)."""
        latest = self.sampler.latest()
        gpus = latest.get("gpu") if latest else None
        return list(gpus) if isinstance(gpus, list | tuple) else []

    def agent_metrics(self) -> str:
        """The agent's own metric families, appended to the telemetry sampler's in /metrics."""
        idle_since = self.decision.idle_since if self.decision else None
        idle_seconds = max(self.clock() - idle_since, 0.0) if idle_since is not None else 0.0
        return agent_metrics.render(self.state, self.tasks, self.config.idle, idle_seconds)
