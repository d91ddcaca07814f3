"""When is this machine idle, and when must it stop? A pure policy: no I/O, no clock reads.

The agent calls ``observe`` once per telemetry sample (and may call it more often, e.g. when a task
ends); time comes in as ``now``. ``now`` and ``last_keepalive`` must come from one clock that survives an
agent restart (``time.time()``), because the state is persisted and reloaded with ``from_state``.

Idle, at an observation, means all of:

- no task is running, and none ran since the previous observation (``task_running`` says both);
- no keepalive within ``client_timeout`` (``now - last_keepalive < client_timeout`` is activity);
- no busy sample inside the sliding ``window``: a sample is busy when CPU >= ``cpu_threshold`` or any GPU
  >= ``gpu_threshold``, and the window holds the samples observed at ``now - window .. now``. Only the
  newest busy sample can decide that, so it is all the policy keeps.

The idle clock (``idle_since``) starts at the first idle observation after activity, so idleness is
always witnessed, never inferred. A keepalive that arrived since ``idle_since`` restarts the clock even if
it already expired before the next observation (sampling gaps must not swallow activity). The machine
stops once ``now - idle_since >= keepalive``: at the first observation at or after that instant, so within
one sample period. It also stops at ``max_lifetime`` after ``started_at`` however busy it is; such a
decision has ``forced`` set and its reason starts with ``max_lifetime``, for the agent's warning.

There is deliberately no input for API reads (status, metrics, samples): monitoring cannot keep a machine
alive because the policy cannot hear it.

``cpu_percent=None`` means the CPU collector failed. It counts as *not busy* (no evidence of load): a
broken collector must never keep a VM alive forever, and running work is still protected by tasks and
keepalives. A NaN reading is treated the same way. An empty ``gpu_percents`` means no GPUs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rawvm_agent.config import IdleConfig
from rawvm_agent.durations import format_duration

MAX_LIFETIME_REASON = "max_lifetime"
_STATE_FORMAT = 1


@dataclass(frozen=True)
class IdleDecision:
    idle: bool
    idle_since: float | None  # start of the current idle stretch; None while active
    stop: bool
    reason: str  # one line, for the status and the log

    @property
    def forced(self) -> bool:
        """Stopping because of max_lifetime (possibly while busy): the agent logs a warning."""
        return self.stop and self.reason.startswith(MAX_LIFETIME_REASON)


class IdlePolicy:
    def __init__(self, config: IdleConfig, started_at: float) -> None:
        self._config = config
        self._started_at = started_at
        self._last_busy_at: float | None = None  # newest observation with CPU or GPU load over threshold
        self._idle_since: float | None = None

    @property
    def started_at(self) -> float:
        return self._started_at

    @property
    def idle_since(self) -> float | None:
        return self._idle_since

    def observe(
        self,
        now: float,
        *,
        task_running: bool,
        cpu_percent: float | None,
        gpu_percents: Sequence[float],
        last_keepalive: float | None,
    ) -> IdleDecision:
        config = self._config
        load = self._load(cpu_percent, gpu_percents)
        if load is not None:
            self._last_busy_at = now

        activity: str | None = None
        if task_running:
            activity = "a task is running"
        elif last_keepalive is not None and now - last_keepalive < config.client_timeout:
            activity = (
                f"keepalive {_ago(now - last_keepalive)} ago (client_timeout {format_duration(config.client_timeout)})"
            )
        elif load is not None:
            activity = load
        elif self._last_busy_at is not None and now - self._last_busy_at <= config.window:
            activity = f"load {_ago(now - self._last_busy_at)} ago, inside the {format_duration(config.window)} window"

        if activity is not None:
            self._idle_since = None
        elif self._idle_since is None or (last_keepalive is not None and last_keepalive >= self._idle_since):
            self._idle_since = now

        idle = activity is None
        idle_for = now - self._idle_since if self._idle_since is not None else 0.0
        if now - self._started_at >= config.max_lifetime:
            state = "idle" if idle else f"busy: {activity}"
            reason = f"{MAX_LIFETIME_REASON} {format_duration(config.max_lifetime)} reached, stopping ({state})"
            return IdleDecision(idle=idle, idle_since=self._idle_since, stop=True, reason=reason)
        if not idle:
            return IdleDecision(idle=False, idle_since=None, stop=False, reason=f"busy: {activity}")
        keepalive = format_duration(config.keepalive)
        if idle_for >= config.keepalive:
            return IdleDecision(
                idle=True, idle_since=self._idle_since, stop=True, reason=f"idle for {_ago(idle_for)} >= {keepalive}"
            )
        return IdleDecision(
            idle=True, idle_since=self._idle_since, stop=False, reason=f"idle for {_ago(idle_for)} of {keepalive}"
        )

    def _load(self, cpu_percent: float | None, gpu_percents: Sequence[float]) -> str | None:
        """Why this sample is busy, or None when every reading is under its threshold (or missing)."""
        config = self._config
        if cpu_percent is not None and not math.isnan(cpu_percent) and cpu_percent >= config.cpu_threshold:
            return f"cpu {cpu_percent:.1f}% >= {config.cpu_threshold:g}%"
        for index, gpu in enumerate(gpu_percents):
            if not math.isnan(gpu) and gpu >= config.gpu_threshold:
                return f"gpu {index} {gpu:.1f}% >= {config.gpu_threshold:g}%"
        return None

    def to_state(self) -> dict[str, Any]:
        """JSON-ready state; ``from_state`` resumes the same idle clock after an agent restart."""
        return {
            "format": _STATE_FORMAT,
            "started_at": self._started_at,
            "last_busy_at": self._last_busy_at,
            "idle_since": self._idle_since,
        }

    @classmethod
    def from_state(cls, config: IdleConfig, state: dict[str, Any]) -> IdlePolicy:
        """The policy ``to_state`` saved, under (possibly changed) ``config``. ValueError if it is not one."""
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"idle state: unknown format {state.get('format')!r}")
        policy = cls(config, _time(state, "started_at", optional=False) or 0.0)
        policy._last_busy_at = _time(state, "last_busy_at")
        policy._idle_since = _time(state, "idle_since")
        return policy


def _time(state: dict[str, Any], key: str, *, optional: bool = True) -> float | None:
    value = state.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"idle state: {key!r} must be a finite number, got {value!r}")
    return float(value)


def _ago(seconds: float) -> str:
    return format_duration(max(0.0, round(seconds, 1)))
