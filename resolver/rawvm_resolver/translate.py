"""Translate a scanned Environment into what uv is asked for: requirements, constraints and indexes.

Requested packages become requirements, every local pin a constraint, so uv adds or removes the
platform-conditional dependencies itself. The rules table decides drops and renames.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from packaging.requirements import Requirement as PepRequirement

from rawvm_resolver.environment import Distribution, Environment, canonical, parse_requirement
from rawvm_resolver.report import ReportRow
from rawvm_resolver.rules import DROP, LINUX_OR_DROP, RENAME, TORCH, TORCH_FAMILY, rule_for, torch_reason
from rawvm_resolver.sources import is_forge_download
from rawvm_resolver.target import Target
from rawvm_resolver.unreachable import index_reason, known_version, local_path_exists, missing_reason, short_url


@dataclass
class Plan:
    requirements: dict[str, str] = field(default_factory=dict)  # name -> PEP 508 string for uv
    constraints: dict[str, str] = field(default_factory=dict)  # name -> exact version
    ranges: dict[str, str] = field(default_factory=dict)  # relaxed pins: name -> the specifier uv chooses within
    rows: dict[str, ReportRow] = field(default_factory=dict)  # decisions made before resolution
    renamed: dict[str, str] = field(default_factory=dict)  # target name -> source name it replaces
    optional_extras: dict[str, tuple[str, ...]] = field(default_factory=dict)  # extras dropped on a conflict
    linux_or_drop: set[str] = field(default_factory=set)  # names dropped (with a warning) when Linux lacks them
    index_or_drop: dict[str, str] = field(default_factory=dict)  # unreachable sources: name -> reason if no release
    uv_runs: int = 0  # how many times uv resolved (or failed to) for this plan
    relaxation_runs: int = 0  # of those, the runs spent finding which inconsistent pins to relax
    local: list[Distribution] = field(default_factory=list)  # editable / local packages to build
    extra_index_urls: list[str] = field(default_factory=list)
    build_constraints: list[str] = field(default_factory=list)  # for sdist builds, here and on the VM alike
    moved_to_wheels: set[str] = field(default_factory=set)  # pins already checked for a compiled wheel
    unbuildable: dict[str, str] = field(default_factory=dict)  # pins relaxed because their sdist fails to build
    excludes: set[str] = field(default_factory=set)  # never resolved, not even as a dependency (uv --excludes)
    warnings: list[str] = field(default_factory=list)

    def requirement_lines(self) -> list[str]:
        return [self.requirements[name] for name in sorted(self.requirements)]

    def constraint_lines(self) -> list[str]:
        exact = [f"{name}=={version}" for name, version in self.constraints.items()]
        return sorted(exact + [f"{name}{spec}" for name, spec in self.ranges.items() if spec])


def translate(env: Environment, target: Target, *, torch_index: str = "", keep_vcs: bool = False) -> Plan:
    """What uv is asked for. ``keep_vcs``: a VCS source stays a VCS requirement (the VM must reach it)."""
    plan = Plan(extra_index_urls=[torch_index] if torch_index else [])
    present = env.by_name()
    for dist in env.distributions:
        if dist.source.kind == "vcs" and keep_vcs:
            commit = f"@{dist.source.commit}" if dist.source.commit else ""
            plan.requirements[dist.name] = f"{dist.name} @ {dist.source.url}{commit}"
            continue
        if dist.source.kind == "archive" and dist.source.local_path is None:
            if is_forge_download(dist.source.url) and not keep_vcs:
                _from_index(plan, dist, target, present)
                continue
            plan.requirements[dist.name] = f"{dist.name} @ {dist.source.url}"  # a remote archive: uv fetches it
            continue
        if dist.is_local and local_path_exists(dist):
            plan.local.append(dist)
            continue
        if dist.is_local or dist.source.kind == "vcs":
            _from_index(plan, dist, target, present)
            continue
        _translate_one(plan, dist.name, dist.version, dist.requested, dist.extras, "", target, present)
    for text in env.requirements:
        requirement = parse_requirement(text)
        if requirement is None:
            continue
        name = canonical(requirement.name)
        _translate_one(plan, name, "", True, tuple(sorted(requirement.extras)), text, target, present)
    if not any(name in plan.requirements or name in plan.constraints for name in TORCH_FAMILY):
        plan.extra_index_urls = []  # no torch: the torch index has nothing to add
    return plan


def _from_index(plan: Plan, dist: Distribution, target: Target, present: dict[str, Distribution]) -> None:
    """A source that is not on this machine: the index release of the same name, never a refusal."""
    version, where = known_version(dist)
    _translate_one(plan, dist.name, version, True, dist.extras, "", target, present)
    plan.index_or_drop[dist.name] = missing_reason(dist)
    if dist.name not in plan.rows:  # a rule (a drop, a rename) has said more already
        shown = version or short_url(dist.source.url)
        plan.rows[dist.name] = ReportRow(dist.name, "translated", shown, "", index_reason(dist, version, where))


def _translate_one(
    plan: Plan,
    name: str,
    version: str,
    requested: bool,
    extras: tuple[str, ...],
    text: str,
    target: Target,
    present: dict[str, Distribution],
) -> None:
    rule = rule_for(name)
    shown = version or text
    if rule is not None and rule.action == DROP:
        plan.rows[name] = ReportRow(name, "dropped", shown, "", rule.reason)
        if rule.macos_only:
            plan.excludes.add(name)  # nor may a package that (wrongly) asks for it on Linux bring it back
        return
    if rule is not None and rule.action == RENAME:
        new = rule.replacement
        new_extras = rule.cuda_extras if target.is_cuda else ()
        if requested:
            plan.requirements[new] = _requirement(new, tuple(sorted({*extras, *new_extras})), "")
            if new_extras:
                plan.optional_extras[new] = new_extras
        # The replacement keeps the version: its own pin if the source has it, else the renamed one's.
        own = present.get(new)
        if own is not None and own.version:
            plan.constraints[new] = own.version
        elif version and rule.same_version:
            plan.constraints[new] = version
        plan.renamed[new] = name
        if not rule.same_version:
            plan.excludes.add(name)  # an alias that no longer installs: a dependency asking for it gets `new`
        reason = rule.cuda_reason if target.is_cuda and rule.cuda_reason else rule.reason
        plan.rows[name] = ReportRow(name, "translated", shown, "", reason)
        return
    if rule is not None and rule.action == TORCH:
        index = plan.extra_index_urls[0] if plan.extra_index_urls else ""
        plan.rows.setdefault(
            name, ReportRow(name, "translated", shown, "", torch_reason(target.arch, target.is_cuda, index))
        )
    if rule is not None and rule.action == LINUX_OR_DROP:
        plan.linux_or_drop.add(name)
        backend = rule.cuda_extras if target.is_cuda else rule.cpu_extras
        if requested and backend:
            if text:
                with_backend = PepRequirement(text)
                with_backend.extras |= set(backend)
                plan.requirements[name] = str(with_backend)
            else:
                plan.requirements[name] = _requirement(name, tuple(sorted({*extras, *backend})), "")
            plan.optional_extras[name] = backend
            plan.rows[name] = ReportRow(name, "translated", shown, "", rule.reason)
            requested = False  # the requirement is written
    if requested:
        plan.requirements[name] = text or _requirement(name, extras, "")
    if version:
        plan.constraints[name] = version


def _requirement(name: str, extras: tuple[str, ...], marker: str) -> str:
    extra_text = f"[{','.join(extras)}]" if extras else ""
    return f"{name}{extra_text}{'; ' + marker if marker else ''}"
