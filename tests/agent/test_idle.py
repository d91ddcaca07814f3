"""The idle policy against a fake clock: hypothesis drives random observation sequences (gaps, tasks,
keepalives, CPU and GPU loads) and every decision is checked against a brute-force restatement of the
rules in rawvm_agent.idle's docstring, plus the properties the agent issue names, each on its own."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rawvm_agent.config import IdleConfig
from rawvm_agent.idle import IdleDecision, IdlePolicy

CPU_THRESHOLD = 10.0
GPU_THRESHOLD = 5.0
NEVER = 1e12  # a max_lifetime that does not interfere


@dataclass(frozen=True)
class Obs:
    t: float
    task: bool
    cpu: float | None
    gpus: tuple[float, ...]
    keepalive: float | None  # a keepalive ping sent at this time (before the observation), if any


@dataclass(frozen=True)
class Scenario:
    config: IdleConfig
    observations: tuple[Obs, ...]


# Integer times and loads keep every comparison exact, so the oracle and the policy cannot differ by
# rounding; the boundaries (== threshold, == window, == client_timeout) are hit often.
@st.composite
def scenarios(draw: st.DrawFn, *, max_lifetime: float = NEVER, min_steps: int = 1) -> Scenario:
    config = IdleConfig(
        keepalive=float(draw(st.integers(0, 120))),
        client_timeout=float(draw(st.integers(1, 60))),
        window=float(draw(st.integers(0, 40))),
        cpu_threshold=CPU_THRESHOLD,
        gpu_threshold=GPU_THRESHOLD,
        max_lifetime=max_lifetime,
        poweroff_command=(),
    )
    steps = draw(st.integers(min_steps, 60))
    activity = draw(st.floats(0.0, 1.0))  # how busy this scenario is, so long idle stretches happen too
    t = 0.0
    observations = []
    for _ in range(steps):
        gap = float(draw(st.integers(1, 30)))
        keepalive = None
        if draw(st.floats(0, 1)) < activity * 0.3:
            keepalive = t + float(draw(st.integers(1, int(gap))))
        t += gap
        busy = draw(st.floats(0, 1)) < activity
        cpu = draw(st.one_of(st.none(), st.integers(0, 100).map(float))) if busy else draw(st.none() | st.just(1.0))
        gpus = tuple(float(g) for g in draw(st.lists(st.integers(0, 100) if busy else st.integers(0, 4), max_size=3)))
        task = busy and draw(st.floats(0, 1)) < 0.3
        observations.append(Obs(t=t, task=task, cpu=cpu, gpus=gpus, keepalive=keepalive))
    return Scenario(config=config, observations=tuple(observations))


def last_keepalive(observations: tuple[Obs, ...], upto: int) -> float | None:
    pings = [o.keepalive for o in observations[: upto + 1] if o.keepalive is not None]
    return max(pings) if pings else None


def observe_step(policy: IdlePolicy, scenario: Scenario, i: int) -> IdleDecision:
    """The policy's decision on the scenario's i-th observation."""
    o = scenario.observations[i]
    return policy.observe(
        o.t,
        task_running=o.task,
        cpu_percent=o.cpu,
        gpu_percents=o.gpus,
        last_keepalive=last_keepalive(scenario.observations, i),
    )


def run(policy: IdlePolicy, scenario: Scenario, start: int = 0) -> list[IdleDecision]:
    return [observe_step(policy, scenario, i) for i in range(start, len(scenario.observations))]


def load_busy(o: Obs) -> bool:
    return (o.cpu is not None and o.cpu >= CPU_THRESHOLD) or any(g >= GPU_THRESHOLD for g in o.gpus)


def oracle_idle(scenario: Scenario, i: int) -> bool:
    """Idle at observation i, straight from the definition, scanning the whole history."""
    c, obs = scenario.config, scenario.observations
    t = obs[i].t
    if obs[i].task:
        return False
    if any(o.keepalive is not None and t - o.keepalive < c.client_timeout for o in obs[: i + 1]):
        return False
    return not any(load_busy(o) for o in obs[: i + 1] if t - c.window <= o.t)


def oracle_idle_since(scenario: Scenario, i: int) -> float | None:
    """Earliest observation j such that j..i are all idle and no keepalive was sent at or after it."""
    obs = scenario.observations
    if not oracle_idle(scenario, i):
        return None
    pings = [o.keepalive for o in obs[: i + 1] if o.keepalive is not None]
    j = i
    while j > 0 and oracle_idle(scenario, j - 1) and all(k < obs[j - 1].t for k in pings):
        j -= 1
    return obs[j].t


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_every_decision_matches_the_definition(scenario: Scenario) -> None:
    decisions = run(IdlePolicy(scenario.config, started_at=0.0), scenario)
    for i, decision in enumerate(decisions):
        since = oracle_idle_since(scenario, i)
        assert decision.idle == oracle_idle(scenario, i), (i, decision)
        assert decision.idle_since == since, (i, decision)
        expected_stop = since is not None and scenario.observations[i].t - since >= scenario.config.keepalive
        assert decision.stop == expected_stop, (i, decision)
        assert not decision.forced


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_never_stops_before_keepalive_of_continuous_idleness(scenario: Scenario) -> None:
    decisions = run(IdlePolicy(scenario.config, started_at=0.0), scenario)
    obs = scenario.observations
    for i, decision in enumerate(decisions):
        if not decision.stop:
            continue
        assert decision.idle_since is not None
        stretch = [j for j in range(i + 1) if obs[j].t >= decision.idle_since]
        # The stretch lasted at least `keepalive`, every observation in it was idle, no ping inside it.
        assert obs[i].t - decision.idle_since >= scenario.config.keepalive
        assert all(oracle_idle(scenario, j) for j in stretch)
        assert all(o.keepalive is None or o.keepalive < decision.idle_since for o in obs[: i + 1])


@settings(max_examples=300, deadline=None)
@given(scenarios(), st.integers(1, 30), st.integers(1, 200))
def test_always_stops_by_keepalive_plus_one_sample_period_once_idle(
    scenario: Scenario, period: int, quiet_steps: int
) -> None:
    """After any history, a quiet tail (no task, no ping, low load) sampled every `period` seconds:
    the policy stops at the first sample at or after idle start + keepalive, i.e. within one period."""
    tail, t = [], scenario.observations[-1].t
    for _ in range(quiet_steps):
        t += period
        tail.append(Obs(t=t, task=False, cpu=0.0, gpus=(0.0,), keepalive=None))
    full = replace(scenario, observations=scenario.observations + tuple(tail))
    decisions = run(IdlePolicy(full.config, started_at=0.0), full)
    first_idle = next((i for i in range(len(scenario.observations), len(full.observations)) if decisions[i].idle), None)
    if first_idle is None:
        return  # the tail was too short to leave the window or the last ping's client_timeout
    idle_start = decisions[first_idle].idle_since
    assert idle_start is not None
    assert all(d.idle for d in decisions[first_idle:])  # nothing in a quiet tail breaks idleness
    deadline = idle_start + full.config.keepalive
    for m in range(first_idle, len(full.observations)):
        t = full.observations[m].t
        assert decisions[m].stop == (t >= deadline)
        if decisions[m].stop:
            if m > first_idle:  # the deadline fell inside the tail: stopped within one period of it
                assert t < deadline + period
            break


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_never_stops_while_a_task_runs_a_gpu_is_busy_or_a_keepalive_is_fresh(scenario: Scenario) -> None:
    decisions = run(IdlePolicy(scenario.config, started_at=0.0), scenario)
    for i, (o, decision) in enumerate(zip(scenario.observations, decisions, strict=True)):
        ping = last_keepalive(scenario.observations, i)
        fresh_ping = ping is not None and o.t - ping < scenario.config.client_timeout
        if o.task or any(g >= GPU_THRESHOLD for g in o.gpus) or fresh_ping:
            assert not decision.idle and not decision.stop, (o, decision)


@settings(max_examples=200, deadline=None)
@given(scenarios(), st.lists(st.integers(0, 4), min_size=60, max_size=60))
def test_monitoring_reads_never_reset_idleness(scenario: Scenario, reads_between: list[int]) -> None:
    """Status, metrics and samples reads reach the policy only as reads of its state: interleaving any
    number of them gives exactly the decisions of a run without them (there is no input for reads)."""
    quiet = IdlePolicy(scenario.config, started_at=0.0)
    watched = IdlePolicy(scenario.config, started_at=0.0)
    expected = run(quiet, scenario)
    got = []
    for i in range(len(scenario.observations)):
        for _ in range(reads_between[i]):
            json.dumps(watched.to_state())
            _ = (watched.idle_since, watched.started_at)
        got.append(observe_step(watched, scenario, i))
    assert got == expected


@settings(max_examples=200, deadline=None)
@given(scenarios(min_steps=2), st.data())
def test_state_round_trip_keeps_the_idle_clock(scenario: Scenario, data: st.DataObject) -> None:
    """An agent restart between two observations (state saved as JSON, policy rebuilt) changes nothing."""
    split = data.draw(st.integers(1, len(scenario.observations) - 1))
    uninterrupted = run(IdlePolicy(scenario.config, started_at=0.0), scenario)
    first = IdlePolicy(scenario.config, started_at=0.0)
    before = run(first, replace(scenario, observations=scenario.observations[:split]))
    restored = IdlePolicy.from_state(scenario.config, json.loads(json.dumps(first.to_state())))
    after = run(restored, scenario, start=split)
    assert before + after == uninterrupted


@settings(max_examples=200, deadline=None)
@given(st.integers(60, 5000), st.integers(1, 120))
def test_max_lifetime_stops_a_busy_machine(max_lifetime: int, period: int) -> None:
    config = IdleConfig(keepalive=60.0, window=30.0, max_lifetime=float(max_lifetime))
    policy = IdlePolicy(config, started_at=100.0)
    t = 100.0
    while True:
        t += period
        decision = policy.observe(t, task_running=True, cpu_percent=99.0, gpu_percents=[99.0], last_keepalive=t)
        assert decision.stop == (t - 100.0 >= max_lifetime)
        if decision.stop:
            assert decision.forced and not decision.idle
            assert decision.reason.startswith("max_lifetime") and "busy" in decision.reason
            assert t - 100.0 < max_lifetime + period
            break


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 30), st.lists(st.sampled_from([None, math.nan]), min_size=1, max_size=5))
def test_a_failed_cpu_collector_does_not_keep_the_machine_alive(period: int, readings: list[float | None]) -> None:
    """cpu_percent None (collector failed) or NaN is no evidence of load: the machine still stops."""
    config = IdleConfig(keepalive=300.0, window=30.0)
    policy = IdlePolicy(config, started_at=0.0)
    t, decision = 0.0, None
    for step in range(10_000):
        t += period
        decision = policy.observe(
            t, task_running=False, cpu_percent=readings[step % len(readings)], gpu_percents=[], last_keepalive=None
        )
        if decision.stop:
            break
    assert decision is not None and decision.stop and not decision.forced
    assert t <= config.keepalive + 2 * period


def observe(policy: IdlePolicy, t: float, **kw: object) -> IdleDecision:
    args: dict[str, object] = {"task_running": False, "cpu_percent": 0.0, "gpu_percents": [], "last_keepalive": None}
    args.update(kw)
    return policy.observe(t, **args)  # type: ignore[arg-type]


def test_window_edges_and_reasons() -> None:
    policy = IdlePolicy(IdleConfig(keepalive=100.0, window=30.0, client_timeout=10.0), started_at=0.0)
    assert observe(policy, 10.0, cpu_percent=10.0).reason == "busy: cpu 10.0% >= 10%"  # threshold is busy
    assert "inside the 30s window" in observe(policy, 40.0).reason  # 40 - 30 = 10: still in the window
    first_idle = observe(policy, 41.0)
    assert first_idle.idle and first_idle.idle_since == 41.0 and first_idle.reason == "idle for 0s of 1m40s"
    assert observe(policy, 100.0, gpu_percents=[0.0, 5.0]).reason == "busy: gpu 1 5.0% >= 5%"
    assert observe(policy, 131.0).idle
    late = observe(policy, 231.0)
    assert late.stop and late.idle_since == 131.0 and late.reason == "idle for 1m40s >= 1m40s"


def test_a_keepalive_that_expired_between_samples_still_restarts_the_clock() -> None:
    policy = IdlePolicy(IdleConfig(keepalive=100.0, window=0.0, client_timeout=10.0), started_at=0.0)
    assert observe(policy, 5.0).idle_since == 5.0
    # A ping at 50 s and the next sample at 90 s: the ping expired at 60 s but was activity all the same.
    decision = observe(policy, 90.0, last_keepalive=50.0)
    assert decision.idle and decision.idle_since == 90.0
    assert not observe(policy, 150.0, last_keepalive=50.0).stop
    assert observe(policy, 190.0, last_keepalive=50.0).stop


def test_restored_state_is_validated() -> None:
    config = IdleConfig()
    with pytest.raises(ValueError, match="format"):
        IdlePolicy.from_state(config, {"started_at": 1.0})
    with pytest.raises(ValueError, match="started_at"):
        IdlePolicy.from_state(config, {"format": 1, "started_at": None})
    with pytest.raises(ValueError, match="idle_since"):
        IdlePolicy.from_state(config, {"format": 1, "started_at": 1.0, "idle_since": "yesterday"})
    restored = IdlePolicy.from_state(config, {"format": 1, "started_at": 7.0, "idle_since": 9, "last_busy_at": None})
    assert (restored.started_at, restored.idle_since) == (7.0, 9.0)
