"""The resolver's front: ``lock(source, target, out_dir)`` scans, translates, resolves with uv and writes the bundle."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from packaging.requirements import InvalidRequirement
from packaging.requirements import Requirement as PepRequirement

from rawvm_resolver import pylock as pylock_module
from rawvm_resolver.bundle import BundleContents, write_bundle
from rawvm_resolver.decisions import report_rows, target_marker_environment
from rawvm_resolver.environment import Environment, canonical, parse_requirement
from rawvm_resolver.errors import InputError, ResolverError
from rawvm_resolver.local import LocalBuild, build_local_packages
from rawvm_resolver.lockfiles import check_not_empty, select_for_target
from rawvm_resolver.project import code_archive, list_project_files
from rawvm_resolver.python_from_index import infer_python_from_index
from rawvm_resolver.report import ReportRow, sorted_rows
from rawvm_resolver.resolve import resolve
from rawvm_resolver.rules import TORCH_CPU_INDEX
from rawvm_resolver.scan import scan
from rawvm_resolver.target import DEFAULT_CUDA, Target, parse_python_version
from rawvm_resolver.translate import Plan, translate


@dataclass(frozen=True)
class LockResult:
    bundle_dir: Path
    manifest_sha256: str  # sha256 of rawvm-env.toml: the root of trust the agent is given
    rows: tuple[ReportRow, ...]  # the translation report, sorted by name
    target: Target
    warnings: tuple[str, ...] = ()
    uv_runs: int = 0  # uv resolutions this lock took, the relaxation's included
    relaxation_runs: int = 0  # of those, the runs spent finding which inconsistent pins to relax
    python_from: str = ""  # how the target's Python was chosen ("--python", or what the source records)


def lock(
    source: str | Path | None,
    target: Target,
    out_dir: Path,
    *,
    torch_index: str = "",
    strict: bool = False,
    progress: Callable[[str], None] | None = None,
    project_dir: Path | None = None,
    conda_channels: Sequence[str] = (),
    pypi_only: bool = False,
    extra_requirements: Sequence[tuple[str, str]] = (),
    keep_vcs: bool = False,
) -> LockResult:
    """Lock ``source`` (None: the running environment) for ``target`` into a bundle at ``out_dir``.

    ``target.python`` may be "" to mean the source environment's Python. ``project_dir`` (default: the current
    directory) is what code.tar.gz holds. ``conda_channels`` overrides the environment's conda channels.
    ``pypi_only`` locks a conda environment from PyPI alone (rawvm_resolver.conda.pypi_only): no conda channel.
    ``extra_requirements`` are ``(PEP 508 requirement, reason)`` pairs added when the environment lacks the
    package (an environment that has it keeps its own version); each shows in the report as ``added``.
    ``keep_vcs`` keeps VCS sources as VCS requirements (the VM must reach them); by default each becomes the index
    release of the same name. ``strict`` refuses any version change, relaxing inconsistent pins included.
    """
    say = progress or (lambda _message: None)
    say(f"scanning {source or 'the running environment'}")
    env = scan(source)
    if not target.python:
        env = infer_python_from_index(env)  # a freeze that records no Python: the one its pins have wheels for
    python_from = "--python" if target.python else env.platform.python_from or "the source environment's Python"
    target = _complete_target(target, env)
    env, marker_rows = select_for_target(env, target_marker_environment(target))
    conversion = None
    if pypi_only and env.conda is not None:
        from rawvm_resolver.conda.pypi_only import to_pypi  # lazy: only conda inputs need it

        say("mapping the conda packages to their PyPI releases (--pypi-only)")
        conversion = to_pypi(env, target)
        env = conversion.environment
    say(f"translating {len(env.distributions)} distributions for {target.platform} Python {target.python}")
    plan = translate(env, target, torch_index=torch_index, keep_vcs=keep_vcs)
    plan.warnings.extend(env.warnings)
    for row in marker_rows:
        plan.rows.setdefault(row.name, row)
    add_extra_requirements(plan, env, extra_requirements)
    with tempfile.TemporaryDirectory(prefix="rawvm-lock-") as scratch:
        work = Path(scratch)
        local = build_local_packages(plan.local, work / "wheels", work / "build")
        _add_local_requirements(plan, local)
        say(f"resolving {len(plan.requirements)} requirements with uv")
        uv_lock = resolve(plan, target, work / "uv", strict=strict, progress=say)
        _check_torch_build(uv_lock, target, torch_index)
        document = pylock_module.build_pylock(
            uv_lock, target, [build.artifact for build in local], plan.extra_index_urls
        )
        rows = report_rows(env, plan, document, target, local)
        if conversion is not None:
            from rawvm_resolver.conda.pypi_only import annotate

            rows = annotate(rows, conversion)
        _check_strict(rows, strict)
        conda_lock = _lock_conda(env, target, say, conda_channels)
        check_not_empty(env, document, rows, conda_lock is not None)
        project = list_project_files(project_dir or Path.cwd(), exclude=(out_dir,))
        for skipped in project.skipped:
            plan.warnings.append(f"code.tar.gz leaves out {skipped}")
        say(f"writing the bundle to {out_dir}")
        contents = BundleContents(
            target=target,
            source=env.platform,
            fingerprint=env.fingerprint(),
            pylock=pylock_module.dumps(document),
            code=code_archive(project),
            conda_lock=conda_lock,
            local_files={build.artifact.path: work / "wheels" / Path(build.artifact.path).name for build in local},
            extra_index_urls=list(plan.extra_index_urls),
            build_constraints=list(plan.build_constraints),
            rows=rows,
        )
        digest = write_bundle(out_dir, contents)
    return LockResult(
        bundle_dir=out_dir.resolve(),
        manifest_sha256=digest,
        rows=tuple(sorted_rows(rows)),
        target=target,
        warnings=tuple(plan.warnings),
        uv_runs=plan.uv_runs,
        relaxation_runs=plan.relaxation_runs,
        python_from=python_from,
    )


def add_extra_requirements(plan: Plan, env: Environment, extra: Sequence[tuple[str, str]]) -> None:
    present = set(env.by_name()) | set(plan.requirements)
    for line, reason in extra:
        try:
            requirement = PepRequirement(line)
        except InvalidRequirement as exc:
            raise InputError(f"{line!r} is not a requirement: {exc}") from None
        name = canonical(requirement.name)
        if name in present:
            continue
        plan.requirements[name] = str(requirement)
        plan.rows[name] = ReportRow(name, "added", "", "", reason)


def _complete_target(target: Target, env: Environment) -> Target:
    if not target.python:
        python = env.platform.python_xy
        target = dataclasses.replace(target, python=parse_python_version(python))
    if target.is_cuda and not target.cuda:
        target = dataclasses.replace(target, cuda=DEFAULT_CUDA)
    if target.arch not in ("x86_64", "aarch64"):
        raise InputError(f"unknown architecture {target.arch!r}: choose x86_64 or aarch64")
    return target


def _add_local_requirements(plan: Plan, local: list[LocalBuild]) -> None:
    """A local package is not resolved by uv (it is in wheels/), but its dependencies are."""
    local_names = {build.artifact.name for build in local}
    for build in local:
        for line in build.requires:
            requirement = parse_requirement(line)
            if requirement is None:
                continue
            name = canonical(requirement.name)
            if requirement.marker is not None and "extra" in str(requirement.marker):
                continue  # extras of the local package were not asked for
            if name not in local_names and name not in plan.requirements:
                plan.requirements[name] = str(requirement)


def _check_torch_build(uv_lock: dict[str, Any], target: Target, torch_index: str) -> None:
    """aarch64 + CUDA: PyPI's torch wheels there were CPU-only for most releases; insist on an index then."""
    names = {canonical(entry["name"]): entry for entry in uv_lock.get("packages", [])}
    if not (target.is_cuda and target.arch == "aarch64" and "torch" in names) or torch_index:
        return
    if any(name.startswith("nvidia-") for name in names):
        return  # this torch release ships CUDA wheels for aarch64 on PyPI
    cuda = target.cuda.replace(".", "")
    raise InputError(
        f"torch {names['torch']['version']} on PyPI has no CUDA build for linux-aarch64: pass --torch-index "
        f"https://download.pytorch.org/whl/cu{cuda} (or drop --cuda; the CPU index is {TORCH_CPU_INDEX})"
    )


def _check_strict(rows: list[ReportRow], strict: bool) -> None:
    if not strict:
        return
    changed = [row for row in rows if row.action == "version-changed"]
    if changed:
        listing = ", ".join(f"{row.name} {row.source} -> {row.target}" for row in changed[:5])
        raise ResolverError(f"--strict: versions would change for the target: {listing}")


def _lock_conda(
    env: Environment, target: Target, say: Callable[[str], None], channels: Sequence[str] = ()
) -> bytes | None:
    conda_input = env.conda
    if conda_input is None or not getattr(conda_input, "specs", None):
        return None
    from rawvm_resolver import conda  # lazy: only conda inputs need rattler

    say(f"solving the conda part for {target.conda_subdir}")
    return conda.lock_conda(cast(Any, conda_input), target, channels=list(channels) or None)
