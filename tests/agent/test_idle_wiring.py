"""How the agent feeds its idle policy: the real Agent.tick, Sampler, Ring and IdlePolicy, with one fake clock.

The CPU reading is scripted (a stand-in for the cpu collector) because this shared machine's load cannot be
controlled; everything from the sample to the stop decision is the agent's own code.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import pytest
from rawvm_agent import idle
from rawvm_agent.app import Agent
from rawvm_agent.config import config_from_dict
from rawvm_agent.state import Phase
from rawvm_agent.telemetry import sampler as sampler_module

from tests.agent.core_helpers import agent_config

WINDOW, KEEPALIVE, THRESHOLD = 10.0, 5.0, 50.0


class ScriptedCpu:
    name = "cpu"

    def __init__(self) -> None:
        self.percent = 0.0

    def collect(self) -> dict[str, Any]:
        return {"percent": self.percent}

    def close(self) -> None:
        pass


async def test_idleness_starts_one_window_after_the_last_busy_sample_not_two(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CPU busy until t=9, then quiet. The policy keeps the window itself, so the machine is idle one window
    after the last busy sample and stops ``keepalive`` later: by t=25 (1 s samples). Feeding the policy a
    window-long mean as well (the old wiring) kept the mean above the threshold for half a window more, and the
    stop came at t=30 or later."""
    now = [0.0]
    monkeypatch.setattr(sampler_module, "time", types.SimpleNamespace(time=lambda: now[0]))
    raw = agent_config(
        tmp_path / "state",
        idle={"window": f"{WINDOW}s", "keepalive": f"{KEEPALIVE}s", "cpu_threshold": THRESHOLD},
        telemetry={"interval": "1s"},
    )
    agent = Agent(config_from_dict(raw), clock=lambda: now[0])
    cpu = ScriptedCpu()
    agent.sampler._collectors = [cpu]  # type: ignore[list-item]
    agent.policy = idle.IdlePolicy(agent.config.idle, started_at=0.0)
    agent.state.phase = Phase.READY  # installed: only tasks, keepalives, CPU and GPU count now
    stopped_at = None
    try:
        for second in range(60):
            now[0] = float(second)
            cpu.percent = 90.0 if second < 10 else 1.0
            agent.sampler.sample_once()
            agent.tick()
            if agent.decision is not None and agent.decision.stop:
                stopped_at = second
                break
    finally:
        if agent._stop_task is not None:
            agent._stop_task.cancel()
        agent.sampler.close()
    assert stopped_at is not None
    assert 9 + WINDOW + KEEPALIVE - 1 <= stopped_at <= 9 + WINDOW + KEEPALIVE + 1
