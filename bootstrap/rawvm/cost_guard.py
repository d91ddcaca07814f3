"""Cost guardrails before a launch: the fleet's $/hour, its worst case until ``max_lifetime``, and ``--max-cost``.

The worst case is what the machines cost if every one runs until its backstop powers it off: ``count`` x the
dearest machine the launch may get x (``max_lifetime`` + the backstop's grace). Over ``--max-cost`` the launch
is refused (the default), or with ``--max-cost-action shorten`` each machine's lifetime is lowered until the
worst case fits. An unknown price with a cap is refused: the cap could not be kept.

The default cap comes from the project's ``pyproject.toml``::

    [tool.rawvm]
    max-cost = 50              # USD per launch, worst case
    max-cost-action = "refuse" # or "shorten"
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rawvm_agent.durations import format_duration

from rawvm.errors import RawvmError, UsageError

ACTIONS = ("refuse", "shorten")
DEFAULT_ACTION = "refuse"
MIN_LIFETIME_S = 600.0  # shorter than this, a machine cannot even install an environment: refuse instead


@dataclass(frozen=True)
class FleetPrice:
    """What a provider knows of a launch's price before it happens."""

    count: int
    machine_hour: float | None  # USD/hour of the dearest machine the launch may get; None: unknown
    basis: str  # e.g. "c7i.large on-demand", "up to m7i.large spot (of c7i.large, m7i.large)"
    why_unknown: str = ""  # e.g. "no price for c7i.large in us-east-1 from the AWS Price List"

    @property
    def fleet_hour(self) -> float | None:
        return None if self.machine_hour is None else self.machine_hour * self.count

    def worst_case(self, lifetime_s: float, grace_s: float) -> float | None:
        hour = self.fleet_hour
        return None if hour is None else hour * (lifetime_s + grace_s) / 3600.0


@dataclass(frozen=True)
class CostPlan:
    lifetime_s: float  # the machines' max_lifetime to launch with (lowered by "shorten")
    line: str  # the one line said before the launch


def _usd(value: float) -> str:
    return f"${value:,.4f}" if value < 1 else f"${value:,.2f}"


def plan(
    price: FleetPrice, *, lifetime_s: float, grace_s: float, max_cost: float | None, action: str = DEFAULT_ACTION
) -> CostPlan:
    """The lifetime to launch with and the one line to say; RawvmError (one line) when the launch is refused."""
    if action not in ACTIONS:
        raise UsageError(f"--max-cost-action {action!r}: choose one of {', '.join(ACTIONS)}")
    hour, worst = price.fleet_hour, price.worst_case(lifetime_s, grace_s)
    until = f"until --max-lifetime {format_duration(lifetime_s)} (+{format_duration(grace_s)} backstop)"
    if hour is None or worst is None:
        if max_cost is not None:
            raise RawvmError(
                f"price unknown ({price.why_unknown or price.basis}): cannot keep --max-cost {_usd(max_cost)}; "
                "launch without a cap (--max-cost none) or where prices can be read (pricing:GetProducts)"
            )
        return CostPlan(lifetime_s, f"price: {price.count} x {price.basis}: unknown ({price.why_unknown}); no cap set")
    head = f"price: {price.count} x {price.basis} = {_usd(hour)}/h; worst case {_usd(worst)} {until}"
    if max_cost is None:
        return CostPlan(lifetime_s, f"{head}; no --max-cost set")
    if worst <= max_cost:
        return CostPlan(lifetime_s, f"{head}; within --max-cost {_usd(max_cost)} (over it: {action})")
    if action == "refuse":
        raise RawvmError(
            f"{head} exceeds --max-cost {_usd(max_cost)}: refused; use fewer or smaller machines, a shorter "
            "--max-lifetime, or --max-cost-action shorten"
        )
    fits_s = math.floor(max_cost / hour * 3600.0 - grace_s)
    if fits_s < MIN_LIFETIME_S:
        raise RawvmError(
            f"{head}: even a {format_duration(MIN_LIFETIME_S)} lifetime exceeds --max-cost {_usd(max_cost)}: refused"
        )
    shortened = price.worst_case(fits_s, grace_s) or 0.0
    return CostPlan(
        float(fits_s),
        f"{head} exceeds --max-cost {_usd(max_cost)}: each machine's lifetime shortened to "
        f"{format_duration(fits_s)} (worst case {_usd(shortened)})",
    )


# -- the project's defaults ---------------------------------------------------------------------------------------


def find_pyproject(start: Path) -> Path | None:
    """The nearest ``pyproject.toml`` at or above ``start`` (as uv finds a project)."""
    here = start.resolve()
    for directory in (here, *here.parents):
        candidate = directory / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def project_defaults(start: Path) -> dict[str, Any]:
    """``max-cost`` and ``max-cost-action`` from the project's ``[tool.rawvm]``; {} when there is none."""
    path = find_pyproject(start)
    if path is None:
        return {}
    try:
        table = tomllib.loads(path.read_text()).get("tool", {}).get("rawvm", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    out: dict[str, Any] = {}
    if "max-cost" in table:
        value = table["max-cost"]
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise UsageError(f"{path}: [tool.rawvm] max-cost must be a positive number of USD, got {value!r}")
        out["max_cost"] = float(value)
    if "max-cost-action" in table:
        if table["max-cost-action"] not in ACTIONS:
            raise UsageError(f"{path}: [tool.rawvm] max-cost-action must be one of {', '.join(ACTIONS)}")
        out["max_cost_action"] = str(table["max-cost-action"])
    return out


def parse_max_cost(value: str | float | None) -> float | None:
    """``--max-cost``: USD > 0, or ``none`` for no cap."""
    if value is None or isinstance(value, float | int):
        if value is not None and (isinstance(value, bool) or value <= 0):
            raise UsageError(f"--max-cost {value}: give a positive amount of USD, e.g. 25, or 'none'")
        return None if value is None else float(value)
    text = value.strip().lstrip("$")
    if text.lower() == "none":
        return None
    try:
        amount = float(text)
    except ValueError:
        raise UsageError(f"--max-cost {value!r}: give an amount of USD, e.g. 25, or 'none'") from None
    if not math.isfinite(amount) or amount <= 0:
        raise UsageError(f"--max-cost {value!r}: give a positive amount of USD, e.g. 25, or 'none'")
    return amount


_NOT_GIVEN = "default"


def resolve(max_cost: str | float | None, action: str, project_dir: Path) -> tuple[float | None, str]:
    """The cap and the action in force: the flag (or API argument) when given, else the project's default.
    ``max_cost`` "default" means "not given"."""
    defaults = project_defaults(project_dir)
    cap = defaults.get("max_cost") if max_cost == _NOT_GIVEN else parse_max_cost(max_cost)
    chosen = action or str(defaults.get("max_cost_action", DEFAULT_ACTION))
    if chosen not in ACTIONS:
        raise UsageError(f"--max-cost-action {chosen!r}: choose one of {', '.join(ACTIONS)}")
    return cap, chosen


def guard(
    estimate: Callable[[], FleetPrice | None] | None,
    *,
    lifetime_s: float,
    grace_s: float,
    max_cost: float | None,
    action: str,
    say: Callable[[str], None],
) -> float:
    """Say the estimate once and return the lifetime to launch with; raise when the launch is refused.
    ``estimate`` None, or an estimate of None: a provider whose machines cost nothing (local, qemu)."""
    price = estimate() if estimate is not None else None
    if price is None:
        return lifetime_s
    result = plan(price, lifetime_s=lifetime_s, grace_s=grace_s, max_cost=max_cost, action=action)
    say(result.line)
    return result.lifetime_s
