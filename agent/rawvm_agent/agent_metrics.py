"""The agent's own Prometheus metric families (phase, tasks, idle clock, limits, install progress).

Kept apart from app.py so the Agent holds the lifecycle and this module only how its state reads as metrics;
the telemetry sampler renders the machine's families and appends these (``GET /metrics``).
"""

from __future__ import annotations

from rawvm_agent.config import IdleConfig
from rawvm_agent.state import AgentState, Phase
from rawvm_agent.tasks import TaskManager
from rawvm_agent.telemetry import prometheus


def render(state: AgentState, tasks: TaskManager, idle: IdleConfig, idle_seconds: float) -> str:
    """The families in Prometheus text format; ``idle_seconds`` is the current stretch of idleness (0 when busy)."""
    install = state.install
    return "".join(
        [
            prometheus.family(
                "rawvm_agent_phase",
                "gauge",
                "Lifecycle phase of the agent (1 for the current one).",
                [({"phase": p.value}, float(p == state.phase)) for p in Phase],
            ),
            prometheus.family(
                "rawvm_agent_tasks",
                "gauge",
                "Tasks known to the agent, by state.",
                [({"state": s}, float(n)) for s, n in sorted(tasks.counts().items())],
            ),
            prometheus.counter(
                "rawvm_agent_tasks_started_total", "Tasks started by this agent process.", tasks.started_total
            ),
            prometheus.gauge("rawvm_agent_idle_seconds", "Seconds of continuous idleness, 0 when busy.", idle_seconds),
            prometheus.gauge(
                "rawvm_agent_keepalive_seconds",
                "Idleness after which the machine powers off.",
                idle.keepalive,
            ),
            prometheus.gauge(
                "rawvm_agent_max_lifetime_seconds",
                "Hard limit on the machine's lifetime.",
                idle.max_lifetime,
            ),
            prometheus.gauge(
                "rawvm_agent_start_time_seconds",
                "When this machine's agent first started, Unix time.",
                state.started_at,
            ),
            prometheus.gauge(
                "rawvm_agent_restarts", "Times the agent process restarted on this machine.", state.restarts
            ),
            prometheus.gauge(
                "rawvm_agent_install_downloaded_bytes",
                "Bytes of the environment bundle downloaded.",
                install.bytes_done,
            ),
            prometheus.gauge(
                "rawvm_agent_install_packages",
                "Packages of the environment installed so far.",
                install.packages_done,
            ),
        ]
    )
