"""``--pypi-only``: the conda part of an environment becomes PyPI pins, so no conda channel is needed.

Each conda package is looked up in the kept name mapping (``pypi_names``). A mapped package becomes a pin of its
PyPI distribution at the conda version when PyPI has that version for the target, else at least the nearest
release that has one (reported ``version-changed``). Conda-only packages (the interpreter, compilers, C/C++
runtimes, system libraries: PyPI wheels bundle what they need) are dropped with their reason. A package the mapping does
not list is taken as the PyPI project of the same name only when PyPI has that exact version; else it is
treated as conda-only and dropped, with that said.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.tags import Tag
from rattler import MatchSpec

from rawvm_resolver.availability import IndexFile, artifact_kind, index_files, nearest_version
from rawvm_resolver.conda.conda_only import conda_only_note, conda_only_reason, named_exactly
from rawvm_resolver.conda.inputs import CondaInput
from rawvm_resolver.conda.pypi_names import pypi_name
from rawvm_resolver.environment import Distribution, Environment, canonical
from rawvm_resolver.platforms import target_tags
from rawvm_resolver.report import ReportRow
from rawvm_resolver.target import Target


@dataclass
class Conversion:
    """What --pypi-only did with the conda part: the environment to lock, and the decisions to report."""

    environment: Environment
    rows: dict[str, ReportRow] = field(default_factory=dict)  # decided here, by conda name (dropped, merged)
    origins: dict[str, tuple[str, str]] = field(default_factory=dict)  # PyPI name -> (conda name, conda version)
    notes: dict[str, str] = field(default_factory=dict)  # PyPI name -> why its pin moved


@dataclass(frozen=True)
class CondaSpec:
    """One conda package of the environment, its version requirement read the PEP 440 way."""

    conda: str
    version: str  # the exact conda version, "" when the spec is a range or absent
    spec: str  # PEP 440 specifier text for a range (">=1.2,<2"), else ""
    only_reason: str = ""  # a broad conda-only pattern matched: dropped unless PyPI has this very version


def to_pypi(env: Environment, target: Target) -> Conversion:
    """``env`` with its conda part replaced by PyPI pins for ``target`` (whose python is already known)."""
    conda = env.conda
    if not isinstance(conda, CondaInput):
        return Conversion(environment=env)
    out = Conversion(environment=env)
    for name, version, why in conda.dropped:
        out.rows[name] = ReportRow(name, "dropped", version, "", f"macOS-only conda package: {why}")
    packages = [read_spec(spec) for spec in conda.specs]
    present = {dist.name for dist in env.distributions} | {_requirement_name(text) for text in env.requirements}
    wanted: dict[str, CondaSpec] = {}
    for package in packages:
        reason = conda_only_reason(package.conda, target)
        mapped = pypi_name(package.conda)
        if mapped.known and mapped.pypi:
            _merge(out, wanted, mapped.pypi, package, present)
        elif reason is not None and (named_exactly(package.conda) or not package.version):
            out.rows[package.conda] = _conda_only_row(package, reason)
        elif reason is not None:
            # lib*, qt*, cuda-*: mostly C libraries, but libsass, qtconsole, cuda-python are Python packages
            _merge(out, wanted, canonical(package.conda), dataclasses.replace(package, only_reason=reason), present)
        else:
            _merge(out, wanted, canonical(package.conda), package, present)
    listings = _listings(sorted(wanted))
    accepted = target_tags(target.python, target.arch, target.glibc)
    dists: list[Distribution] = list(env.distributions)
    requirements: list[str] = list(env.requirements)
    for name, package in sorted(wanted.items()):
        unmapped = canonical(package.conda) == name and not pypi_name(package.conda).known
        files = listings[name]
        decision = _decide(name, package, files, accepted, target, unmapped=unmapped)
        if isinstance(decision, ReportRow):
            out.rows[package.conda] = decision
            continue
        out.origins[name] = (package.conda, package.version)
        pin, note = decision
        if note:
            out.notes[name] = note
        if pin and pin == package.version:
            dists.append(Distribution(name=name, display_name=name, version=pin, requested=True))
        elif pin:
            # PyPI lacks the conda version: a floor, not a pin, so the packages that moved with it still fit
            requirements.append(f"{name}>={pin}")
        else:
            requirements.append(f"{name}{package.spec}")
    out.environment = dataclasses.replace(
        env,
        conda=None,
        distributions=tuple(sorted(dists, key=lambda dist: dist.name)),
        requirements=tuple(requirements),
    )
    return out


def annotate(rows: Iterable[ReportRow], conversion: Conversion) -> list[ReportRow]:
    """The lock's report with each converted package named by its conda origin, plus the rows decided here."""
    result: list[ReportRow] = []
    for row in rows:
        origin = conversion.origins.get(row.name)
        if origin is None:
            result.append(row)
            continue
        conda_name, conda_version = origin
        shown = row.target if conda_name == row.name or not row.target else f"{row.name} {row.target}"
        via = f"conda package {conda_name}" + ("" if conda_name == row.name else f" is PyPI's {row.name}")
        if row.action == "dropped":
            result.append(ReportRow(conda_name, "dropped", conda_version or row.source, "", f"{via}; {row.reason}"))
        elif conda_version and row.target and row.target != conda_version:
            why = conversion.notes.get(row.name) or row.reason
            result.append(ReportRow(conda_name, "version-changed", conda_version, shown, f"{via}: {why}"))
        elif row.action in ("kept", "version-changed"):
            reason = f"{via}: its PyPI release, {'same version' if conda_version else 'as asked'} (--pypi-only)"
            result.append(ReportRow(conda_name, "translated", conda_version or row.source, shown, reason))
        else:  # a rule's own decision (torch's build, builds-from-source): keep it, say where it came from
            result.append(ReportRow(conda_name, row.action, conda_version or row.source, shown, f"{via}; {row.reason}"))
    names = {row.name for row in result}
    result += [row for name, row in sorted(conversion.rows.items()) if name not in names]
    return result


def _merge(out: Conversion, wanted: dict[str, CondaSpec], name: str, package: CondaSpec, present: set[str]) -> None:
    if name in present:  # pip installed it on top: pip's version is the one the user ran
        out.rows[package.conda] = ReportRow(
            package.conda, "dropped", package.version, "", f"PyPI's {name} is in the pip section too: pip's pin is kept"
        )
        return
    first = wanted.get(name)
    if first is None:
        wanted[name] = package
        return
    # conda splits some distributions (matplotlib + matplotlib-base): one PyPI pin, the own-named one preferred
    keep, other = (package, first) if canonical(package.conda) == name else (first, package)
    wanted[name] = keep
    out.rows[other.conda] = ReportRow(
        other.conda, "dropped", other.version, "", f"conda's part of PyPI's {name}, which {keep.conda} brings"
    )


def _decide(
    name: str, package: CondaSpec, files: list[IndexFile], accepted: frozenset[Tag], target: Target, *, unmapped: bool
) -> tuple[str, str] | ReportRow:
    """(pin or "", note) for a package that goes to PyPI, or the row that drops it."""
    conda, version = package.conda, package.version
    if not files and package.only_reason:
        return _conda_only_row(package, package.only_reason)
    if not files:
        if unmapped:
            why = "conda-only: not in the name mapping, and PyPI has no project of that name"
        else:
            why = f"the name mapping names PyPI's {name}, which has no release on the index"
        return ReportRow(conda, "dropped", version, "", why)
    if not version:
        return "", ""
    exact = [file for file in files if str(file.version) == version or _same(file, version)]
    if unmapped and not exact and package.only_reason:
        return _conda_only_row(package, package.only_reason)
    if unmapped and not exact:
        return ReportRow(
            conda,
            "dropped",
            version,
            "",
            f"conda-only: not in the name mapping, and PyPI's {name} has no {version} (so it is another project)",
        )
    if artifact_kind(files, version, accepted):
        return version, ""
    try:
        nearest = nearest_version(files, version, accepted)
    except ValueError:
        nearest = ""
    if nearest:
        where = f"{target.platform} (Python {target.python})"
        return nearest, f"PyPI has no {version} for {where}: at least the nearest release with one, {nearest}"
    return "", f"conda's {version} is no PyPI version and has no near release: the newest that fits"


def _same(file: IndexFile, version: str) -> bool:
    try:
        return bool(SpecifierSet(f"=={version}").contains(file.version, prereleases=True))
    except InvalidSpecifier:
        return False


def _listings(names: list[str]) -> dict[str, list[IndexFile]]:
    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(names, pool.map(lambda name: list(index_files(name)), names), strict=True))


def read_spec(spec: str) -> CondaSpec:
    """A conda match spec as an exact version or a PEP 440 range (``numpy 1.26.*`` -> ``==1.26.*``)."""
    match = MatchSpec(spec)
    name = str(match.name.normalized)
    text = str(match.version) if match.version is not None else ""
    if exact := re.fullmatch(r"==\s*([^,|*\s]+)", text):
        return CondaSpec(name, exact.group(1), "")
    if wildcard := re.fullmatch(r"([0-9][^,|*\s]*)\.\*", text):
        return CondaSpec(name, "", f"=={wildcard.group(1)}.*")
    try:
        return CondaSpec(name, "", str(SpecifierSet(text)) if text else "")
    except InvalidSpecifier:
        return CondaSpec(name, "", "")  # a conda-only form (1.2|1.3): let uv choose


def _conda_only_row(package: CondaSpec, reason: str) -> ReportRow:
    return ReportRow(package.conda, "dropped", package.version, "", conda_only_note(reason))


def _requirement_name(text: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", text)
    return canonical(match.group(1)) if match else ""
