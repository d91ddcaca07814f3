"""Resolve a Plan with uv, and when uv says no, find out why and make the smallest honest change.

The changes, each reported: a pin with no artifact for the target moves to the nearest version that has one;
a package Linux never had (mlx, by rule) is dropped with a warning; CUDA extras added by a rule are given
up when they conflict; a source that was not on this machine and has no index release is dropped with a warning.
When the pins themselves conflict (pip installed an inconsistent set), the fewest pins that uv's explanation
names are relaxed (see relax.py). ``strict`` turns every change into an error. Running uv is compile.py's job,
reading its messages uv_messages.py's.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from packaging.tags import Tag

from rawvm_resolver.availability import artifact_kind, index_files, nearest_version, platforms_offered
from rawvm_resolver.compile import UvFailure, run_uv
from rawvm_resolver.environment import canonical, parse_requirement
from rawvm_resolver.errors import ResolverError
from rawvm_resolver.follow import follow_moved_pins
from rawvm_resolver.platforms import target_tags
from rawvm_resolver.relax import RELAXATION_SECONDS, relax_pins
from rawvm_resolver.report import ReportRow
from rawvm_resolver.target import Target
from rawvm_resolver.translate import Plan
from rawvm_resolver.uv_messages import build_cause, conflict, is_unsatisfiable, mentioned, named_packages, summarise

_MAX_ATTEMPTS = 16


def resolve(
    plan: Plan, target: Target, work_dir: Path, *, strict: bool, progress: Callable[[str], None]
) -> dict[str, Any]:
    """The parsed pylock.toml uv wrote for the (possibly adjusted) plan."""
    if not plan.requirements:
        return {"packages": []}
    deadline = time.monotonic() + RELAXATION_SECONDS
    explanation = ""  # uv's last "no solution" when it is already known (a relaxation step returns it)
    for attempt in range(_MAX_ATTEMPTS):
        if not explanation:
            try:
                locked = run_uv(plan, target, work_dir / f"attempt-{attempt}")
                if strict or not _prefer_wheels(plan, target, locked):
                    return locked
                progress("compiled packages pinned at releases without a wheel for the target; moving them")
                continue
            except UvFailure as failure:
                if not is_unsatisfiable(failure.stderr):
                    if _fix_build(plan, target, failure.stderr, strict=strict):
                        progress("an sdist does not build here; changing how it is built or which release")
                        continue
                    raise ResolverError(f"uv failed for {target.platform}: {summarise(failure.stderr, 500)}") from None
                explanation = failure.stderr
        progress("uv found no solution; checking which pins the target lacks")
        if _adjust(plan, target, explanation, strict=strict):
            explanation = ""
            continue
        if strict:
            raise conflict(f"cannot lock for {target.platform}", explanation)
        progress("the pins conflict with each other; relaxing the ones uv names")
        try:
            outcome = relax_pins(plan, target, work_dir / f"relax-{attempt}", explanation, deadline)
        except UvFailure as failure:  # a relaxation let uv pick an sdist that does not build
            if _fix_build(plan, target, failure.stderr, strict=False):
                explanation = ""
                continue
            raise ResolverError(f"uv failed for {target.platform}: {summarise(failure.stderr, 500)}") from None
        if isinstance(outcome, dict):
            if not _prefer_wheels(plan, target, outcome):
                return outcome
            explanation = ""
            continue
        explanation = outcome  # the conflict the relaxed pin left: adjust or relax again, without rerunning uv
    names = named_packages(explanation)
    last = f"; the last conflict was about {', '.join(names)}" if names else ""
    raise ResolverError(f"cannot lock for {target.platform}: gave up after {_MAX_ATTEMPTS} attempts{last}")


def _prefer_wheels(plan: Plan, target: Target, locked: dict[str, Any]) -> bool:
    """Move pins the lock would build from source although the package ships compiled wheels for the target in
    other releases (pyarrow 9.0.0 on Python 3.11): its sdist needs a compiler and the library's C/C++
    dependencies on the VM. A pure-Python sdist (no platform wheel in any release) builds anywhere and stays.
    True when a pin moved and uv must run again."""
    sdist_only = [
        canonical(str(package.get("name", "")))
        for package in locked.get("packages", [])
        if "sdist" in package and not package.get("wheels")
    ]
    names = [name for name in sdist_only if name in plan.constraints and name not in plan.moved_to_wheels]
    if not names:
        return False
    accepted = target_tags(target.python, target.arch, target.glibc)
    with ThreadPoolExecutor(max_workers=8) as pool:
        listings = dict(zip(names, pool.map(index_files, names), strict=True))
    moved: dict[str, str] = {}
    for name in names:
        plan.moved_to_wheels.add(name)
        compiled = [file for file in listings[name] if file.tags & accepted and _is_platform_wheel(file.tags)]
        nearest = nearest_version(compiled, plan.constraints[name], accepted)
        if not nearest:
            continue
        pin = plan.constraints[name]
        plan.constraints[name] = nearest
        reason = (
            f"{pin} has no wheel for {target.platform} (Python {target.python}) and its sdist is compiled code: "
            f"nearest release with a wheel"
        )
        prior = plan.rows.get(name)
        if prior is not None and prior.action in ("translated", "version-changed"):
            reason = f"{prior.reason}; {reason}"
        plan.rows[name] = ReportRow(
            name, "version-changed", prior.source if prior and prior.source else pin, nearest, reason
        )
        moved[name] = nearest
    if moved:
        follow_moved_pins(plan, target, moved)
    return bool(moved)


def _is_platform_wheel(tags: frozenset[Tag]) -> bool:
    return any(tag.platform != "any" for tag in tags)


def _fix_build(plan: Plan, target: Target, stderr: str, *, strict: bool) -> bool:
    """A build failure uv reported, answered by a build constraint or a pin change; False when neither applies."""
    return _old_setuptools_needed(plan, stderr) or _unbuildable_pin(plan, target, stderr, strict=strict)


# setuptools 82 removed pkg_resources, which many older setup.py files import.
SETUPTOOLS_WITH_PKG_RESOURCES = "setuptools<82"


def _old_setuptools_needed(plan: Plan, stderr: str) -> bool:
    """An sdist's build failed for want of pkg_resources: build sdists with the last setuptools that has it.

    The constraint is recorded in the bundle, so the VM builds that sdist the same way (a build constraint
    touches only build environments, never the locked packages)."""
    match = _BUILD_FAILURE.search(stderr)
    if match is None or "No module named 'pkg_resources'" not in stderr:
        return False
    if SETUPTOOLS_WITH_PKG_RESOURCES in plan.build_constraints:
        return False
    plan.build_constraints.append(SETUPTOOLS_WITH_PKG_RESOURCES)
    plan.warnings.append(
        f"{match.group(1)}=={match.group(2)}: its setup.py imports pkg_resources, which setuptools 82 removed: "
        f"sdists build with {SETUPTOOLS_WITH_PKG_RESOURCES}, here and on the VM"
    )
    return True


_BUILD_FAILURE = re.compile(r"Failed to (?:download and )?build `([A-Za-z0-9][A-Za-z0-9._-]*)==([^`]+)`")


def _unbuildable_pin(plan: Plan, target: Target, stderr: str, *, strict: bool) -> bool:
    """A pinned sdist whose build (for its metadata) fails with today's build tools: gym 0.21.0's setup.py is
    rejected by setuptools >= 67. The pin moves to the nearest release with a wheel for the target, else it is
    relaxed for uv to choose; False when the failure is not about a pin (the caller reports uv's error)."""
    match = _BUILD_FAILURE.search(stderr)
    if match is None:
        return False
    name, version = canonical(match.group(1)), match.group(2)
    cause = build_cause(stderr[match.end() :])
    if name in plan.unbuildable and not strict:
        # Its pin was relaxed for this already, and uv's choice does not build either: no release builds today
        # and none has a wheel. The VM could not install it either; the rest of the environment is kept.
        reason = (
            f"WARNING: no release of {name} has a wheel for {target.platform} and the sdists uv tried do not build "
            f"with today's build tools ({cause}): dropped"
        )
        _remove(plan, name)
        plan.rows[name] = ReportRow(name, "dropped", plan.unbuildable[name], "", reason)
        plan.warnings.append(f"{name}: {reason}")
        return True
    if plan.constraints.get(name) != version:
        relaxed = None if strict else _past_compatible_release(plan.requirements.get(name, ""), version)
        if relaxed is None:
            raise ResolverError(
                f"{name}=={version} (the release the environment allows) cannot be used on {target.platform}: its "
                f"sdist does not build with today's build tools ({cause}); allow another {name} release or remove it"
            )
        asked = plan.requirements[name]
        plan.requirements[name] = relaxed
        reason = (
            f"{asked} allows only {version}, whose sdist does not build with today's build tools ({cause}): "
            f"relaxed to {relaxed}, uv chose the version"
        )
        plan.rows[name] = ReportRow(name, "version-changed", asked.removeprefix(name), "", reason)
        plan.warnings.append(f"{name}: {reason}")
        return True
    if strict:
        raise ResolverError(f"--strict: the sdist of {name}=={version} does not build for {target.platform}: {cause}")
    files = index_files(name)
    accepted = target_tags(target.python, target.arch, target.glibc)
    wheels = [file for file in files if file.tags & accepted]
    nearest = nearest_version(wheels, version, accepted)
    why = f"the sdist of {version} does not build with today's build tools ({cause})"
    if nearest:
        plan.constraints[name] = nearest
        plan.rows[name] = ReportRow(name, "version-changed", version, nearest, f"{why}: nearest release with a wheel")
        follow_moved_pins(plan, target, {name: nearest})
    else:
        del plan.constraints[name]
        plan.unbuildable[name] = version
        plan.rows[name] = ReportRow(name, "version-changed", version, "", f"{why} and no release has a wheel: uv chose")
    plan.warnings.append(f"{name}=={version}: {why}")
    return True


def _past_compatible_release(text: str, version: str) -> str | None:
    """``gym~=0.21.0`` whose only release fails to build -> ``gym>0.21.0``: a compatible-release request asks
    for "about this version", so the next releases honour it best. None for any other specifier (the user's)."""
    requirement = parse_requirement(text)
    if requirement is None or not requirement.specifier or any(spec.operator != "~=" for spec in requirement.specifier):
        return None
    extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
    marker = f"; {requirement.marker}" if requirement.marker else ""
    return f"{requirement.name}{extras}>{version}{marker}"


def _adjust(plan: Plan, target: Target, stderr: str, *, strict: bool) -> bool:
    candidates = sorted(set(plan.constraints) | set(plan.requirements))
    suspects = mentioned(stderr, candidates)
    if _fix_missing_artifacts(plan, target, suspects, strict=strict):
        return True
    if plan.optional_extras:
        _drop_optional_extras(plan, target, stderr, strict=strict)
        return True
    rest = [name for name in sorted(plan.constraints) if name not in suspects]
    return _fix_missing_artifacts(plan, target, rest, strict=strict)


def _fix_missing_artifacts(plan: Plan, target: Target, names: list[str], *, strict: bool) -> bool:
    accepted = target_tags(target.python, target.arch, target.glibc)
    with ThreadPoolExecutor(max_workers=8) as pool:
        listings = dict(zip(names, pool.map(index_files, names), strict=True))
    changed = False
    moved: dict[str, str] = {}
    for name in names:
        files = listings[name]
        pin = plan.constraints.get(name, "")
        if pin and artifact_kind(files, pin, accepted):
            continue  # this pin is fine for the target: not the problem
        if not pin and any(file.tags & accepted or file.is_sdist for file in files):
            continue
        nearest = nearest_version(files, pin, accepted) if pin else ""
        if nearest:
            if strict:
                raise ResolverError(
                    f"--strict: {name}=={pin} has no wheel or sdist for {target.platform} (Python {target.python}); "
                    f"the nearest release with one is {nearest}"
                )
            plan.constraints[name] = nearest
            reason = (
                f"{pin} has no wheel or sdist for {target.platform} (Python {target.python}): nearest release with one"
            )
            if name in plan.index_or_drop and name in plan.rows:
                reason = f"{plan.rows[name].reason}; {reason}"  # keep why the source was replaced
            plan.rows[name] = ReportRow(name, "version-changed", pin, nearest, reason)
            moved[name] = nearest
            changed = True
        elif name in plan.linux_or_drop or name in plan.index_or_drop:
            if strict:
                raise ResolverError(f"--strict: {name} has no build for {target.platform}; it would be dropped")
            _remove(plan, name)
            offered = ", ".join(platforms_offered(files)) or "none"
            reason = f"WARNING: no build for {target.platform} at glibc {target.glibc} (wheels for: {offered}): dropped"
            if not files and name in plan.index_or_drop:
                reason = plan.index_or_drop[name]
            plan.rows[name] = ReportRow(name, "dropped", pin, "", reason)
            plan.warnings.append(f"{name}: {reason}")
            changed = True
        elif name in plan.requirements and pin and not files:
            # A pinned name the index has never heard of: conda (or another tool) installed it, not pip
            # (nb-conda, a private package). Dropping it keeps the rest of the environment; the report says so.
            if strict:
                raise ResolverError(f"--strict: {name}=={pin} has no release on the index; it would be dropped")
            _remove(plan, name)
            reason = f"WARNING: {name}=={pin} has no release on the index (conda or another tool installed it): dropped"
            plan.rows[name] = ReportRow(name, "dropped", pin, "", reason)
            plan.warnings.append(f"{name}: {reason}")
            changed = True
        elif name in plan.requirements:
            platforms = platforms_offered(files)
            where = f"its wheels are for {', '.join(platforms)}" if platforms else "the index has no release of it"
            if any(platform.startswith(("manylinux", "musllinux", "linux")) for platform in platforms):
                pythons = sorted({tag.interpreter for file in files for tag in file.tags if tag.interpreter != "py3"})
                raise ResolverError(
                    f"{name} has no build for {target.platform} Python {target.python} ({where}; for "
                    f"{', '.join(pythons[-4:]) or 'other Pythons'}): remove it from the environment, or lock for a "
                    f"Python it supports (--python)"
                )
            raise ResolverError(
                f"{name} exists for no Linux platform ({where}): remove it from the environment, "
                f"or lock for a platform it supports"
            )
        elif pin:
            del plan.constraints[name]  # a dependency pinned at a version Linux lacks: let uv choose
            changed = True
    if moved:
        follow_moved_pins(plan, target, moved)
    return changed


def _drop_optional_extras(plan: Plan, target: Target, stderr: str, *, strict: bool) -> None:
    for name, extras in sorted(plan.optional_extras.items()):
        if strict:
            raise conflict(f"--strict: {name}[{','.join(extras)}] does not resolve with the rest", stderr)
        plan.requirements[name] = name
        source = plan.renamed.get(name, name)
        if source in plan.rows:
            row = plan.rows[source]
            reason = (
                f"{row.reason.split(':')[0]}: plain {name}, because {name}[{','.join(extras)}] pins CUDA libraries "
                f"that conflict with the rest of the environment (it runs on CPU unless CUDA libraries are found)"
            )
            plan.rows[source] = ReportRow(row.name, row.action, row.source, row.target, reason)
        plan.warnings.append(f"{name}: [{','.join(extras)}] dropped, it conflicts with the rest of the environment")
    plan.optional_extras.clear()


def _remove(plan: Plan, name: str) -> None:
    plan.requirements.pop(name, None)
    plan.constraints.pop(name, None)
    plan.ranges.pop(name, None)
    plan.optional_extras.pop(name, None)  # else giving up the extras would bring the package back
