"""A pin moved for the target takes its own dependencies along.

``tensorflow-macos==2.9.2`` becomes ``tensorflow``, which has no Python 3.11 wheel before 2.12.0, so the pin moves
to 2.12.0. tensorflow 2.12.0 asks for ``keras>=2.12,<2.13`` and ``tensorboard>=2.12,<2.13`` while the freeze
pins keras 2.9.0 and tensorboard 2.9.1: they were the 2.9 family, and must move with it. Read from the moved
wheel's own metadata, those pins are relaxed at once, each with the reason, instead of uv finding them one
conflict (and one slow resolution) at a time.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from packaging.requirements import Requirement
from packaging.tags import Tag
from packaging.version import InvalidVersion, Version

from rawvm_resolver.availability import IndexFile, index_files
from rawvm_resolver.decisions import target_marker_environment
from rawvm_resolver.environment import canonical, parse_requirement
from rawvm_resolver.platforms import target_tags
from rawvm_resolver.report import ReportRow
from rawvm_resolver.target import Target
from rawvm_resolver.translate import Plan
from rawvm_resolver.wheel_metadata import wheel_requirements


def follow_moved_pins(plan: Plan, target: Target, moved: dict[str, str]) -> list[str]:
    """Relax the pins that ``moved`` (name -> its new version) refuse on the target; the names relaxed."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        needs = dict(zip(moved, pool.map(lambda name: _requires(name, moved[name], target), moved), strict=True))
    relaxed: list[str] = []
    for name, requirements in needs.items():
        for requirement in requirements:
            dependency = canonical(requirement.name)
            pin = plan.constraints.get(dependency)
            if pin is None or dependency in moved or _fits(pin, requirement):
                continue
            del plan.constraints[dependency]
            reason = (
                f"{name} moved to {moved[name]} for the target and needs {dependency}{requirement.specifier}: "
                f"the source's {pin} came with the old {name}, uv chose the version"
            )
            plan.rows[dependency] = ReportRow(dependency, "version-changed", pin, "", reason)
            plan.warnings.append(f"{dependency}=={pin}: follows {name} to {moved[name]}")
            relaxed.append(dependency)
    return relaxed


def _requires(name: str, version: str, target: Target) -> list[Requirement]:
    """What the target's wheel of ``name==version`` requires on the target (markers evaluated, no extras)."""
    accepted = target_tags(target.python, target.arch, target.glibc)
    wheel = _wheel_for(index_files(name), version, accepted)
    if wheel is None:
        return []
    environment = target_marker_environment(target)
    found = []
    for line in wheel_requirements(wheel):
        requirement = parse_requirement(line)
        if requirement is not None and (requirement.marker is None or requirement.marker.evaluate(environment)):
            found.append(requirement)
    return found


def _wheel_for(files: tuple[IndexFile, ...], version: str, accepted: frozenset[Tag]) -> IndexFile | None:
    try:
        wanted = Version(version)
    except InvalidVersion:
        return None
    return next((file for file in files if file.version == wanted and file.tags & accepted), None)


def _fits(pin: str, requirement: Requirement) -> bool:
    try:
        return requirement.specifier.contains(Version(pin), prereleases=True)
    except InvalidVersion:
        return True  # a legacy version: leave it to uv
