"""The final report: compare the source environment with uv's lock and say, per package, what happened and why."""

from __future__ import annotations

from typing import Any

from packaging.markers import InvalidMarker, UndefinedComparison, UndefinedEnvironmentName
from packaging.requirements import InvalidRequirement
from packaging.requirements import Requirement as PepRequirement

from rawvm_resolver.environment import Environment, canonical, requirement_edge
from rawvm_resolver.local import LocalBuild
from rawvm_resolver.report import ReportRow
from rawvm_resolver.target import Target
from rawvm_resolver.translate import Plan

_CUDA_PREFIXES = ("nvidia-", "cuda-", "triton")


def target_marker_environment(target: Target) -> dict[str, str]:
    return {
        "os_name": "posix",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": target.arch,
        "platform_release": "",
        "platform_version": "",
        "python_version": target.python,
        "python_full_version": f"{target.python}.0",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "implementation_version": f"{target.python}.0",
        "extra": "",
    }


def report_rows(
    env: Environment, plan: Plan, pylock: dict[str, Any], target: Target, local: list[LocalBuild]
) -> list[ReportRow]:
    locked = {canonical(entry["name"]): entry for entry in pylock.get("packages", [])}
    local_names = {build.artifact.name for build in local}
    rows: dict[str, ReportRow] = {}
    source_names = set()
    edges = _edges(env)
    for dist in env.distributions:
        if dist.name in local_names:
            continue
        source_names.add(dist.name)
        rows[dist.name] = _source_row(dist.name, dist.version, plan, locked, edges, target)
    for name, row in plan.rows.items():
        if name not in rows:  # a requirement-file entry without a pin
            rows[name] = _fill_target(row, plan, locked)
    for build in local:
        artifact = build.artifact
        if artifact.is_sdist:
            rows[artifact.name] = ReportRow(
                artifact.name,
                "builds-from-source",
                artifact.version,
                artifact.version,
                f"local package with compiled code from {build.source}: ships as an sdist, builds on the VM",
            )
        else:
            rows[artifact.name] = ReportRow(
                artifact.name,
                "kept",
                artifact.version,
                artifact.version,
                f"local package from {build.source}: built as a pure-Python wheel in wheels/",
            )
    replacements = set(plan.renamed)
    for name, entry in locked.items():
        if name in rows or name in local_names:
            continue
        if name in replacements and plan.renamed[name] in rows:
            continue  # named by the translated row
        rows[name] = _added_row(name, entry, edges, target)
    return [_flag_sdist(row, locked, target) for row in rows.values()]


def _source_row(
    name: str,
    version: str,
    plan: Plan,
    locked: dict[str, dict[str, Any]],
    edges: dict[str, list[tuple[str, str]]],
    target: Target,
) -> ReportRow:
    if name in plan.rows:
        return _fill_target(plan.rows[name], plan, locked)
    if name in locked:
        now = str(locked[name]["version"])
        if now == version:
            return ReportRow(name, "kept", version, now, "same version")
        return ReportRow(name, "version-changed", version, now, "uv chose another version for the target")
    return ReportRow(name, "dropped", version, "", _drop_reason(name, edges, target))


def _fill_target(row: ReportRow, plan: Plan, locked: dict[str, dict[str, Any]]) -> ReportRow:
    if row.action == "dropped":
        return row
    replacement = next((new for new, old in plan.renamed.items() if old == row.name), row.name)
    entry = locked.get(replacement)
    if entry is None:
        return ReportRow(row.name, "dropped", row.source, "", f"{row.reason}; not needed on the target")
    version = str(entry["version"])
    shown = f"{replacement} {version}" if replacement != row.name else version
    return ReportRow(row.name, row.action, row.source, shown, row.reason)


def _edges(env: Environment) -> dict[str, list[tuple[str, str]]]:
    """dependency name -> [(parent, marker text)] from the source's Requires-Dist."""
    edges: dict[str, list[tuple[str, str]]] = {}
    for dist in env.distributions:
        for line in dist.requires:
            edge = requirement_edge(line)
            if edge is not None:
                edges.setdefault(edge[0], []).append((dist.name, edge[1]))
    return edges


def _marker_true(marker: str, target: Target) -> bool:
    if not marker:
        return True
    try:
        return PepRequirement(f"x; {marker}").marker.evaluate(target_marker_environment(target))  # type: ignore[union-attr]
    except (InvalidMarker, InvalidRequirement, UndefinedComparison, UndefinedEnvironmentName):
        return False


def _drop_reason(name: str, edges: dict[str, list[tuple[str, str]]], target: Target) -> str:
    platform_only = [(parent, marker) for parent, marker in edges.get(name, []) if marker and "extra" not in marker]
    if platform_only:
        parent, marker = sorted(platform_only)[0]
        return f"needed only on the source platform ({parent} requires it when {marker})"
    return f"nothing on {target.platform} requires it"


def _added_row(name: str, entry: dict[str, Any], edges: dict[str, list[tuple[str, str]]], target: Target) -> ReportRow:
    version = str(entry["version"])
    parents = sorted(parent for parent, marker in edges.get(name, []) if _marker_true(marker, target))
    if parents:
        reason = f"required on {target.platform} by {', '.join(parents[:3])}"
    elif name.startswith(_CUDA_PREFIXES):
        reason = "CUDA library wheel the target's torch / tensorflow / jax build pulls in"
    else:
        reason = "not pinned in the source (or not installed there): uv chose it for the target"
    return ReportRow(name, "added", "", version, reason)


def _flag_sdist(row: ReportRow, locked: dict[str, dict[str, Any]], target: Target) -> ReportRow:
    entry = locked.get(row.name)
    if row.action == "builds-from-source" or entry is None or "wheels" in entry or "sdist" not in entry:
        return row
    reason = f"no wheel for {target.platform} (Python {target.python}): builds from its sdist on the VM"
    if row.action in ("translated", "version-changed"):
        reason = f"{row.reason}; {reason}"  # the change stays in the report, not only the build
    return ReportRow(row.name, "builds-from-source", row.source, row.target, reason)
