"""The typed picture of a scanned environment: its Python, its platform and every distribution in it."""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

# Where a distribution came from (PEP 610 direct_url.json, or the conda-meta record).
SOURCE_KINDS = ("index", "editable", "directory", "vcs", "archive", "conda")


@dataclass(frozen=True)
class Source:
    kind: str = "index"  # one of SOURCE_KINDS
    url: str = ""  # file:// path, VCS URL or archive URL; "" for an index
    commit: str = ""  # VCS commit id
    channel: str = ""  # conda channel (conda sources only)
    build: str = ""  # conda build string
    subdir: str = ""  # conda subdir, e.g. osx-arm64

    @property
    def local_path(self) -> Path | None:
        """The path on this machine for file:// sources, else None."""
        if not self.url.startswith("file://"):
            return None
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(self.url).path))


@dataclass(frozen=True)
class Distribution:
    name: str  # canonical (PEP 503) name
    version: str
    installer: str = ""  # pip, uv, conda, ...
    requested: bool = False  # installed on purpose (REQUESTED), not as a dependency
    source: Source = field(default_factory=Source)
    requires: tuple[str, ...] = ()  # Requires-Dist lines, markers included
    wheel_tags: tuple[str, ...] = ()  # Tag lines of the WHEEL file, e.g. cp311-cp311-macosx_11_0_arm64
    display_name: str = ""  # the name as the METADATA spells it
    extras: tuple[str, ...] = ()  # extras asked for (known for requirement-file inputs only)
    marker: str = ""  # PEP 508 marker a lock file records: the pin holds only where it is true (for the target)

    @property
    def is_local(self) -> bool:
        return self.source.kind in ("editable", "directory", "archive")


@dataclass(frozen=True)
class SourcePlatform:
    python: str  # full version, e.g. 3.11.7 ("3.11" when only X.Y is known)
    platform: str  # a wheel platform tag, e.g. macosx_14_0_arm64, or "" when unknown
    os: str = ""  # macos | linux | windows | ""
    arch: str = ""  # arm64 | x86_64 | aarch64 | ""
    libc: str = ""  # glibc version on Linux, macOS version on macOS
    python_from: str = ""  # how the Python was chosen when the input records none (for the report)

    @property
    def python_xy(self) -> str:
        return ".".join(self.python.split(".")[:2])


@dataclass(frozen=True)
class Environment:
    origin: str  # what was scanned, for messages: a path or "running environment"
    kind: str  # environment | requirements | project | conda
    platform: SourcePlatform
    distributions: tuple[Distribution, ...] = ()  # sorted by name
    requirements: tuple[str, ...] = ()  # requested PEP 508 strings when the input is a file, not an install
    conda: object | None = None  # rawvm_resolver.conda.CondaInput when there is a conda part
    warnings: tuple[str, ...] = ()  # what reading the input left out, for the lock's warnings

    def by_name(self) -> dict[str, Distribution]:
        return {dist.name: dist for dist in self.distributions}

    def fingerprint(self) -> str:
        """sha256 over names, versions and sources: what makes two environments the same for locking."""
        payload = {
            "python": self.platform.python,
            "platform": self.platform.platform,
            "distributions": [
                [d.name, d.version, d.requested, asdict(d.source)] for d in sorted(self.distributions, key=_key)
            ],
            "requirements": sorted(self.requirements),
            "conda": repr(self.conda) if self.conda is not None else "",
        }
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        return f"sha256:{digest}"


def _key(dist: Distribution) -> str:
    return dist.name


def canonical(name: str) -> str:
    return str(canonicalize_name(name))


_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


@functools.lru_cache(maxsize=65536)
def parse_requirement(text: str) -> Requirement | None:
    """``text`` as a PEP 508 requirement; None when it is not one (pip freezes and metadata hold such lines, and
    the callers skip them)."""
    try:
        return Requirement(text)
    except InvalidRequirement:
        return None


def requirement_edge(line: str) -> tuple[str, str] | None:
    """(canonical name, marker text) of a Requires-Dist line; None when it has no name.

    A regex, not a full PEP 508 parse: scanning reads thousands of these and only needs the two parts.
    """
    match = _NAME.match(line)
    if match is None:
        return None
    _, _, marker = line.partition(";") if "@" not in line else line.rpartition(" ;")
    return canonical(match.group(1)), marker.strip()
