"""The sampler: every ``interval`` seconds, ask each collector, keep the sample in the ring and on disk.

One tick is a handful of psutil calls (plus cached-handle NVML queries), run in one worker thread so the event
loop (and its watchdog ping) never waits on a slow driver. Reading samples is never activity; this module only
reports, the idle logic decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

from rawvm_agent.config import TelemetryConfig
from rawvm_agent.telemetry import prometheus
from rawvm_agent.telemetry.collectors import (
    Collector,
    CpuCollector,
    DiskCollector,
    GpmCollector,
    GpuCollector,
    LoadCollector,
    MemoryCollector,
    NetworkCollector,
    ProcessesCollector,
    TreeCpuCollector,
    TreeMemoryCollector,
)
from rawvm_agent.telemetry.ring import Ring, Summary
from rawvm_agent.telemetry.sample import Sample, array_header, pack, unpack
from rawvm_agent.telemetry.store import Store

log = logging.getLogger("rawvm_agent.telemetry")

TELEMETRY_DIR = "telemetry"


def _summary(sample: Sample) -> Summary:
    cpu = sample.get("cpu")
    gpus = sample.get("gpu") or ()
    return Summary(
        t=float(sample["t"]),
        cpu_percent=float(cpu["percent"]) if isinstance(cpu, dict) else None,
        gpu_percent=tuple(g.get("utilization_gpu_percent") for g in gpus),
    )


class _Broken:
    """Stands in for a collector whose construction failed: every tick reports that error under its name."""

    def __init__(self, name: str, error: Exception) -> None:
        self.name = name
        self.error = f"{type(error).__name__}: {error}"

    def collect(self) -> Any:
        raise RuntimeError(self.error)

    def metrics(self, value: Any) -> Iterator[str]:
        return iter(())

    def close(self) -> None:
        pass


def _build(factory: Callable[..., Collector], name: str, *args: Any) -> Collector:
    try:
        return factory(*args)
    except Exception as exc:
        log.warning("telemetry: collector %s could not start: %s", name, exc)
        return _Broken(name, exc)


class Sampler:
    def __init__(self, config: TelemetryConfig, state_dir: Path) -> None:
        if config.interval <= 0:
            raise ValueError("telemetry.interval must be positive")
        if config.scope not in ("machine", "process-tree"):
            raise ValueError(f"telemetry.scope must be 'machine' or 'process-tree', not {config.scope!r}")
        tree = config.scope == "process-tree"
        self.interval = config.interval
        capacity = max(1, math.ceil(config.ring_seconds / config.interval))
        gpu = _build(GpuCollector, "gpu", config.nvml_library)
        self._gpu = gpu if isinstance(gpu, GpuCollector) else GpuCollector.none()
        gpm = _build(GpmCollector, "gpu_profiling", self._gpu)  # before gpu: it closes first, NVML still up
        self._gpm = gpm if isinstance(gpm, GpmCollector) else None
        self._collectors: list[Collector] = [
            _build(TreeCpuCollector if tree else CpuCollector, "cpu"),
            _build(TreeMemoryCollector if tree else MemoryCollector, "memory"),
            _build(DiskCollector, "disk"),
            _build(NetworkCollector, "network"),
            _build(LoadCollector, "load"),
            _build(ProcessesCollector, "processes"),
            gpm,
            gpu,
        ]
        self._lock = threading.Lock()
        self._ring = Ring(capacity)
        self._store = Store(Path(state_dir) / TELEMETRY_DIR, segment_frames=capacity)
        self._latest: Sample | None = None
        self._failing: dict[str, str] = {}
        self._store_error = ""
        self._persisting = False
        try:
            self._store.load(self._reload)
            self._persisting = True
        except OSError as exc:  # an unwritable state dir costs the history on disk, not the telemetry
            log.warning("telemetry: %s unusable, keeping samples in memory only: %s", self._store.directory, exc)
        if self._latest is not None:
            log.info("telemetry: reloaded %d samples up to seq %d", len(self._ring), self._ring.last_seq)
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._process = psutil.Process(os.getpid())

    def _reload(self, sample: Sample, frame: bytes) -> None:
        if sample["seq"] > self._ring.last_seq:  # the ring keeps the newest; older frames just pass through
            self._ring.append(sample["seq"], frame, _summary(sample))
            self._latest = sample

    # -- the interface the agent uses ---------------------------------------------------------------------------

    @property
    def gpu_count(self) -> int:
        return self._gpu.count

    async def start(self) -> None:
        """Start the sampling loop (and the NVML XID event thread) on the running event loop."""
        if self._task is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rawvm-sampler")
        self._gpu.start_events()
        self._task = asyncio.create_task(self._run(), name="rawvm-telemetry")

    async def stop(self) -> None:
        """Stop sampling, flush to disk, release NVML. Safe to call twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, True)  # a tick in flight finishes first
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Release NVML and close the store; what ``stop`` ends with. For samplers that never started."""
        for collector in self._collectors:
            try:
                collector.close()
            except Exception:
                log.exception("telemetry: closing %s failed", collector.name)
        with self._lock:
            try:
                self._store.close()
            except OSError as exc:
                log.warning("telemetry: closing the store failed: %s", exc)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            try:
                await loop.run_in_executor(self._executor, self.sample_once)
            except Exception:
                log.exception("telemetry: sample failed")
            deadline += self.interval
            delay = deadline - loop.time()
            if delay < 0:  # fell behind (suspended, overloaded): skip the missed ticks instead of bursting
                deadline = loop.time()
                delay = 0.0
            await asyncio.sleep(delay)

    def sample_once(self) -> Sample:
        """Take one sample now: ask every collector, keep it in the ring and append it to disk."""
        sample: Sample = {"seq": 0, "t": round(time.time(), 3)}
        errors: dict[str, str] = {}
        for collector in self._collectors:
            try:
                sample[collector.name] = collector.collect()
            except Exception as exc:
                errors[collector.name] = f"{type(exc).__name__}: {exc}"
        if errors:
            sample["errors"] = errors
        self._log_changes(errors)
        with self._lock:
            sample["seq"] = self._ring.last_seq + 1
            frame = pack(sample)
            self._ring.append(sample["seq"], frame, _summary(sample))
            self._latest = sample
            self._persist(frame)
        return sample

    def _persist(self, frame: bytes) -> None:
        """Append to disk; a full or failing disk is logged once and never stops sampling."""
        if not self._persisting:
            return
        try:
            self._store.append(frame)
        except OSError as exc:
            if not self._store_error:
                log.warning("telemetry: writing %s failed: %s", self._store.directory, exc)
            self._store_error = str(exc)
        else:
            if self._store_error:
                log.info("telemetry: writing to %s works again", self._store.directory)
            self._store_error = ""

    def _log_changes(self, errors: dict[str, str]) -> None:
        """Log a collector when it starts or stops failing, not on every tick."""
        for name, error in errors.items():
            if self._failing.get(name) != error:
                log.warning("telemetry: collector %s failing: %s", name, error)
        for name in self._failing.keys() - errors.keys():
            log.info("telemetry: collector %s recovered", name)
        self._failing = errors

    def samples_after(self, seq: int, limit: int = 3600, newest: bool = False) -> list[Sample]:
        """Samples with a seq greater than ``seq``, oldest first, at most ``limit`` (the newest ones with
        ``newest``)."""
        with self._lock:
            compressed = self._ring.compressed_after(seq, limit, newest)
        return [unpack(zlib.decompress(frame)) for frame in compressed]

    def samples_after_msgpack(self, seq: int, limit: int = 3600, newest: bool = False) -> bytes | bytearray:
        """The same samples as one msgpack array, straight from the packed frames (never unpacked)."""
        with self._lock:
            compressed = self._ring.compressed_after(seq, limit, newest)
        out = bytearray(array_header(len(compressed)))
        for frame in compressed:
            out += zlib.decompress(frame)  # grow one buffer: no list of expanded frames beside it
        return out

    def latest(self) -> Sample | None:
        with self._lock:
            return self._latest

    def cpu_percent(self, window_s: float) -> float | None:
        """Mean total CPU busy percent over the samples of the last ``window_s`` seconds.

        None when the newest sample has no CPU reading (the collector is failing) or there is no sample yet.
        """
        with self._lock:
            last = self._ring.last_summary()
            if last is None or last.cpu_percent is None:
                return None
            values = [s.cpu_percent for s in self._ring.summaries_since(time.time() - window_s)]
        readings = [v for v in values if v is not None]
        if not readings:
            return last.cpu_percent  # window shorter than one interval: the newest reading stands for it
        return sum(readings) / len(readings)

    def gpu_utilization(self, window_s: float) -> list[float]:
        """Highest utilization percent of each GPU over the last ``window_s`` seconds (0.0 where unknown)."""
        count = self.gpu_count
        if count == 0:
            return []
        peak = [0.0] * count
        with self._lock:
            summaries = self._ring.summaries_since(time.time() - window_s)
            last = self._ring.last_summary()
        if not summaries and last is not None:
            summaries = [last]
        for summary in summaries:
            for i, value in enumerate(summary.gpu_percent[:count]):
                if value is not None and value > peak[i]:
                    peak[i] = float(value)
        return peak

    def flush(self) -> None:
        """Push buffered frames to disk (before copying the telemetry files to the sink)."""
        with self._lock:
            try:
                self._store.flush()
            except OSError as exc:
                log.warning("telemetry: flushing %s failed: %s", self._store.directory, exc)

    def telemetry_files(self) -> list[Path]:
        """The on-disk segments, oldest first: what the stop sequence copies to the sink."""
        return self._store.segments()

    # -- Prometheus -----------------------------------------------------------------------------------------------

    def render_prometheus(self, extra: str = "") -> str:
        """The whole /metrics page: every collector's families from the newest sample, then ``extra``."""
        sample = self.latest()
        parts: list[str] = []
        success: list[tuple[prometheus.Labels, float]] = []
        for collector in self._collectors:
            value = sample.get(collector.name) if sample else None
            ok = value is not None
            if ok:
                try:
                    parts.extend(collector.metrics(value))
                except Exception as exc:
                    log.warning("telemetry: rendering %s failed: %s", collector.name, exc)
                    ok = False
            success.append(({"collector": collector.name}, 1 if ok else 0))
        parts.append(
            prometheus.family(
                "rawvm_telemetry_collector_success",
                "gauge",
                "1 when the collector's newest reading succeeded.",
                success,
            )
        )
        if sample is not None:
            parts.append(
                prometheus.gauge(
                    "rawvm_telemetry_last_sample_timestamp_seconds",
                    "Unix time of the newest telemetry sample.",
                    sample["t"],
                )
            )
            parts.append(
                prometheus.gauge(
                    "rawvm_telemetry_last_sample_seq", "Sequence number of the newest sample.", sample["seq"]
                )
            )
        parts.extend(self._process_families())
        if extra:
            parts.append(extra if extra.endswith("\n") else extra + "\n")
        return "".join(parts)

    def render_dcgm(self) -> str:
        """The GPU fields alone, exactly as dcgm-exporter names and labels them (see telemetry/dcgm.py)."""
        sample = self.latest()
        gpus = sample.get("gpu") if sample else None
        page = "".join(self._gpu.dcgm_metrics(gpus)) if isinstance(gpus, list) else ""
        profiling = sample.get(GpmCollector.name) if sample else None
        if self._gpm is not None and isinstance(profiling, list):
            page += "".join(self._gpm.dcgm_metrics(profiling))
        return page

    def _process_families(self) -> list[str]:
        """The agent's own footprint, under the names every Prometheus client library uses."""
        try:
            with self._process.oneshot():
                cpu = self._process.cpu_times()
                rss = self._process.memory_info().rss
                start = self._process.create_time()
                fds = self._process.num_fds() if hasattr(self._process, "num_fds") else None
        except psutil.Error:
            return []
        out = [
            prometheus.counter(
                "process_cpu_seconds_total",
                "Agent CPU time, user and system, in seconds.",
                round(cpu.user + cpu.system, 3),
            ),
            prometheus.gauge("process_resident_memory_bytes", "Agent resident memory, in bytes.", rss),
            prometheus.gauge("process_start_time_seconds", "Agent start, in unix seconds.", start),
        ]
        if fds is not None:
            out.append(prometheus.gauge("process_open_fds", "Agent open file descriptors.", fds))
        return out

    def __repr__(self) -> str:
        return f"Sampler(interval={self.interval}, gpus={self.gpu_count}, samples={len(self._ring)})"


__all__ = ["Sampler"]
