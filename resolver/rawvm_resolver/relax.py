"""Relax pins that conflict with each other: pip freezes are what was installed, not laws.

pip installs whatever it is told, so a freeze can hold pins that cannot all hold at once (``torchvision==0.9.0``
needs ``torch==1.8.0`` while ``torch==1.10.2`` is frozen), or that only conflict on Linux (a dependency behind a
``sys_platform == "linux"`` marker). uv then says the requirements are unsatisfiable and names the pins in its
explanation. We relax few of those, greedily: the most likely culprit first, to the range uv says is needed
(else a floor at the pin), following the conflict from pin to pin as uv names the next one, within a bound of
uv runs and of wall time. Every other pin keeps its exact version; each relaxed pin is reported as
``version-changed`` with uv's own reason.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet

from rawvm_resolver.compile import UvFailure, UvTimeout, run_uv
from rawvm_resolver.report import ReportRow
from rawvm_resolver.target import Target
from rawvm_resolver.translate import Plan
from rawvm_resolver.uv_messages import conflict, is_unsatisfiable, mentioned, summarise

MAX_RELAXATION_RUNS = 24  # uv runs one lock may spend finding which pins to relax
RELAXATION_SECONDS = 480.0  # and the wall time those runs may take together (a first, cold-cache lock is slower)
RUN_SECONDS = 90.0  # one candidate that keeps uv searching longer is not the one (uv is backtracking far)
_REASON_LIMIT = 400
# "conan==1.51.3 depends on distro{sys_platform == 'linux'}>=1.0.2,<=1.6.0 and ...": the name and the range.
# "conan==1.51.3 depends on jinja2>=3.0": who asks (conan) for what (jinja2).
_ASKS = re.compile(
    r"([a-z0-9][a-z0-9.-]*)(?:\[[^\]]*\])?(?:[<>=!~]=?[^\s,]*(?:,[<>=!~]=?[^\s,]*)*)? depends on ([a-z0-9][a-z0-9.-]*)"
)
_DEPENDS_ON = re.compile(
    r"depends on ([a-z0-9][a-z0-9.-]*)(?:\[[^\]]*\])?(?:\{[^}]*\})?((?:[<>=!~]=?[^\s,]*[^\s,.],?)*)"
)


def relax_pins(plan: Plan, target: Target, work_dir: Path, stderr: str, deadline: float) -> dict[str, Any] | str:
    """The lock once conflicting pins are relaxed, or the conflict left after relaxing one (uv's explanation).

    The candidates are the pins uv's explanation names, most likely culprit first. A relaxed pin becomes a range
    (``Plan.ranges``): the range uv says another package needs of it, else a floor at the pinned version (newer
    releases fit newer dependencies, and uv never backtracks into old sdists it would have to build). The first
    candidate whose relaxation resolves wins. The first whose relaxation moves the conflict elsewhere (uv no
    longer names it) stays relaxed and the new explanation is returned, so the caller follows the chain one uv
    run per link. When no single pin helps, every pin uv names is unpinned at once. Raises ResolverError (one
    line, uv's reason) when nothing can be relaxed or the bound (MAX_RELAXATION_RUNS uv runs, ``deadline`` on the
    monotonic clock) is spent.
    """
    candidates = relaxation_order(plan, stderr)
    if not candidates:
        raise conflict(f"cannot lock for {target.platform}", stderr)
    needed = required_ranges(stderr)
    searching = []  # candidates whose run kept uv busy past RUN_SECONDS
    tried: set[str] = set()  # pins already unpinned in this call (an asker swapped in)
    for name in candidates:
        if name in tried:
            continue
        before = (plan.constraints.get(name), plan.ranges.get(name))
        pin = plan.constraints.pop(name, None)
        if pin is not None:
            plan.ranges[name] = needed.get(name, f">={pin}")
        else:
            plan.ranges.pop(name)  # relaxed to a range already: lift the range too
        try:
            outcome = _try(plan, target, work_dir / f"without-{name}", deadline, stderr)
        except UvFailure:
            _restore(plan, name, *before)  # nothing relaxed without its row: the caller fixes the build, then retries
            raise
        if isinstance(outcome, dict):
            _report(plan, name, pin or before[1] or "", stderr)
            return outcome
        if isinstance(outcome, str) and _moved(plan, name, stderr, outcome):
            asker = next(
                (a for a in askers(stderr).get(name, []) if a in plan.constraints and mentioned(outcome, [a])), ""
            )
            if asker:  # the package that asked is in trouble still: it, not its dependency, is what must move
                tried.add(asker)
                swapped = _swap(plan, target, work_dir, deadline, stderr, name, before, asker)
                if swapped is not None:
                    return swapped
            _report(plan, name, pin or before[1] or "", stderr)
            return outcome
        _restore(plan, name, *before)
        if outcome is None:
            searching.append(name)
    saved = {name: (plan.constraints.get(name), plan.ranges.get(name)) for name in candidates}
    relaxed = {name: plan.constraints.pop(name, "") or plan.ranges.pop(name, "") for name in candidates}
    try:
        outcome = _try(plan, target, work_dir / "without-all-named", deadline, stderr)
    except UvFailure:
        for name, before in saved.items():
            _restore(plan, name, *before)
        raise
    if outcome is None:
        slow = f" (relaxing {', '.join(searching)} kept uv searching past {RUN_SECONDS:.0f} s)" if searching else ""
        raise conflict(f"cannot lock for {target.platform}: the pins conflict{slow}", stderr)
    for name, pin in relaxed.items():
        _report(plan, name, pin, stderr)
    return outcome


def required_ranges(explanation: str) -> dict[str, str]:
    """The ranges uv says packages need of a name (``depends on jinja2>=3.0,<4.0.0``), where all agree on one."""
    found: dict[str, set[str]] = {}
    for match in _DEPENDS_ON.finditer(explanation.lower().replace("_", "-")):
        spec = match.group(2).rstrip(",")
        try:
            SpecifierSet(spec)
        except InvalidSpecifier:
            continue
        if spec:
            found.setdefault(match.group(1), set()).add(spec)
    return {name: specs.pop() for name, specs in found.items() if len(specs) == 1}


def _swap(
    plan: Plan,
    target: Target,
    work_dir: Path,
    deadline: float,
    stderr: str,
    name: str,
    before: tuple[str | None, str | None],
    asker: str,
) -> dict[str, Any] | str | None:
    """Unpin ``asker`` instead of relaxing ``name`` (its dependency); None, with ``name`` relaxed as it was, when
    that does not help either."""
    relaxed_to = plan.ranges.get(name)
    _restore(plan, name, *before)
    pin = plan.constraints.pop(asker)
    try:
        outcome = _try(plan, target, work_dir / f"without-{asker}", deadline, stderr)
    except UvFailure:
        plan.constraints[asker] = pin
        raise
    if isinstance(outcome, dict) or (isinstance(outcome, str) and not mentioned(outcome, [asker])):
        _report(plan, asker, pin, stderr)
        return outcome
    plan.constraints[asker] = pin
    plan.constraints.pop(name, None)
    if relaxed_to is not None:
        plan.ranges[name] = relaxed_to
    return None


def _moved(plan: Plan, name: str, old: str, new: str) -> bool:
    """Whether relaxing ``name`` moved the conflict on: uv no longer names it, or names a pin it did not before
    (statsmodels wanted packaging>=21.3; granted, poetry's packaging<21 is the conflict now)."""
    if not mentioned(new, [name]):
        return True
    pins = sorted(plan.constraints)
    return bool(set(mentioned(new, pins)) - set(mentioned(old, pins)))


def askers(explanation: str) -> dict[str, list[str]]:
    """For each name uv says a package "depends on", the packages that ask for it, in uv's order."""
    found: dict[str, list[str]] = {}
    for match in _ASKS.finditer(explanation.lower().replace("_", "-")):
        found.setdefault(match.group(2), []).append(match.group(1))
    return found


def _restore(plan: Plan, name: str, pin: str | None, relaxed_to: str | None) -> None:
    plan.ranges.pop(name, None)
    if pin is not None:
        plan.constraints[name] = pin
    if relaxed_to is not None:
        plan.ranges[name] = relaxed_to


def _try(plan: Plan, target: Target, work_dir: Path, deadline: float, explanation: str) -> dict[str, Any] | str | None:
    """One relaxation run: the lock, uv's new explanation of why there is none, or None when uv ran too long."""
    left = deadline - time.monotonic()
    if plan.relaxation_runs >= MAX_RELAXATION_RUNS or left <= 0:
        spent = f"{plan.relaxation_runs} uv runs" if left > 0 else f"{RELAXATION_SECONDS:.0f} s of uv runs"
        raise conflict(
            f"cannot lock for {target.platform}: the pins conflict and {spent} found no set to relax", explanation
        )
    plan.relaxation_runs += 1
    try:
        return run_uv(plan, target, work_dir, timeout=min(left, RUN_SECONDS))
    except UvTimeout:
        return None
    except UvFailure as failure:
        if not is_unsatisfiable(failure.stderr):
            raise  # a build failed, not the resolution: relax_pins restores the pins, the caller fixes the build
        return failure.stderr


def relaxation_order(plan: Plan, explanation: str) -> list[str]:
    """The pins uv's explanation names, most likely culprit first.

    First a pin already moved for the target (it is no longer what the user had), then a dependency uv says a
    package "depends on" (moving it into the range keeps the package that asks for it), then the others in
    the order uv names them; last a pin already relaxed to a range (lifting it lets uv go further).
    """
    named = mentioned(explanation, sorted({*plan.constraints, *plan.ranges}))
    depended = {match.group(1) for match in _DEPENDS_ON.finditer(explanation.lower().replace("_", "-"))}
    changed = {name for name, row in plan.rows.items() if row.action == "version-changed"}

    def rank(item: tuple[int, str]) -> tuple[int, int]:
        position, name = item
        group = 3 if name in plan.ranges else 0 if name in changed else 1 if name in depended else 2
        return (group, position)

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
