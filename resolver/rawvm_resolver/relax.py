"""Relax pins that conflict with each other: pip freezes are what was installed, not laws.

pip installs whatever it is told, so a freeze can hold pins that cannot all hold at once (``torchvision==0.9.0``
needs ``torch==1.8.0`` while ``torch==1.10.2`` is frozen), or that only conflict on Linux (a dependency behind a
``sys_platform == "linux"`` marker). uv then says the requirements are unsatisfiable and names the pins in its
explanation. We relax the fewest of those: each named pin alone first (the first that resolves wins), else the
one whose removal moves the conflict elsewhere, then again, within a bound of uv runs. Every other pin keeps
its exact version; each relaxed pin is reported as ``version-changed`` with uv's own reason.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rawvm_resolver.compile import UvFailure
from rawvm_resolver.errors import ResolverError
from rawvm_resolver.report import ReportRow
from rawvm_resolver.resolve import is_unsatisfiable, mentioned, run_uv, summarise
from rawvm_resolver.target import Target
from rawvm_resolver.translate import Plan

MAX_RELAXATION_RUNS = 12  # uv runs one lock may spend finding which pins to relax
_REASON_LIMIT = 400


def relax_pins(plan: Plan, target: Target, work_dir: Path, stderr: str) -> dict[str, Any] | None:
    """The lock once the fewest conflicting pins are relaxed; None when the plan changed and uv should run again.

    Raises ResolverError (one line, uv's reason) when the conflict names no pin or the bound is spent.
    """
    explanation = stderr
    candidates = relaxation_order(plan, explanation)
    if not candidates:
        raise ResolverError(f"cannot lock for {target.platform}: {summarise(explanation)}")
    moved: tuple[str, str] | None = None  # a pin whose removal left a different conflict, and that conflict
    for name in candidates:
        if plan.relaxation_runs >= MAX_RELAXATION_RUNS:
            raise ResolverError(
                f"cannot lock for {target.platform}: the pins conflict and {MAX_RELAXATION_RUNS} uv runs found no "
                f"small set to relax: {summarise(explanation)}"
            )
        pin = plan.constraints.pop(name)
        plan.relaxation_runs += 1
        try:
            locked = run_uv(plan, target, work_dir / f"without-{name}")
        except UvFailure as failure:
            plan.constraints[name] = pin
            if not is_unsatisfiable(failure.stderr):
                raise ResolverError(f"uv failed for {target.platform}: {summarise(failure.stderr)}") from None
            if moved is None and not mentioned(failure.stderr, [name]):
                moved = (name, failure.stderr)
            continue
        _report(plan, name, pin, explanation)
        return locked
    if moved is None:
        raise ResolverError(f"cannot lock for {target.platform}: {summarise(explanation)}")
    name, _ = moved
    _report(plan, name, plan.constraints.pop(name), explanation)
    return None  # the caller runs uv again: the next conflict may be one it fixes itself


def relaxation_order(plan: Plan, explanation: str) -> list[str]:
    """The pins uv's explanation names, most likely culprit first.

    First a pin already moved for the target (it is no longer what the user had), then a dependency uv says a
    package "depends on" (moving it into the range keeps the package that asks for it), then the others in
    the order uv names them.
    """
    named = mentioned(explanation, sorted(plan.constraints))
    lowered = explanation.lower().replace("_", "-")
    depended = {match.group(1) for match in re.finditer(r"depends on ([a-z0-9][a-z0-9.-]*?)(?=[<>=!~;, ]|$)", lowered)}
    changed = {name for name, row in plan.rows.items() if row.action == "version-changed"}

    def rank(item: tuple[int, str]) -> tuple[int, int]:
        position, name = item
        return (0 if name in changed else 1 if name in depended else 2, position)

    return [name for _, name in sorted(enumerate(named), key=rank)]


def _report(plan: Plan, name: str, pin: str, explanation: str) -> None:
    because = re.sub(r"^No solution found when resolving dependencies\W*(cause:)?\s*", "", summarise(explanation))
    if len(because) > _REASON_LIMIT:
        because = because[: _REASON_LIMIT - 1] + "…"
    prior = plan.rows.get(name)
    reason = f"the source environment was inconsistent: {because}"
    if prior is not None and prior.action in ("translated", "version-changed"):
        reason = f"{prior.reason}; then {reason}"
    shown = prior.source if prior is not None and prior.source else pin
    plan.rows[name] = ReportRow(name, "version-changed", shown, "", reason)
    plan.warnings.append(f"{name}=={pin} conflicts with other pins of the source: relaxed, uv chose the version")
