"""Local packages (editable installs, local directories and archives) built for the bundle's ``wheels/``.

Pure-Python ones travel as wheels (portable); compiled ones travel as sdists and build on the VM.
Builds use SOURCE_DATE_EPOCH so the same source gives the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import zipfile
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename

from rawvm_resolver.compile import uv_bin
from rawvm_resolver.environment import Distribution
from rawvm_resolver.errors import ResolverError
from rawvm_resolver.pylock import LocalArtifact

SOURCE_DATE_EPOCH = "315532800"  # 1980-01-01, the earliest date a zip file can hold


@dataclass(frozen=True)
class LocalBuild:
    artifact: LocalArtifact
    requires: tuple[str, ...]  # Requires-Dist of the built package: they join the requirements
    source: str  # what it was built from, for the report


def build_local_packages(dists: list[Distribution], wheels_dir: Path, work_dir: Path) -> list[LocalBuild]:
    return [_build_one(dist, wheels_dir, work_dir / dist.name) for dist in sorted(dists, key=lambda d: d.name)]


def _build_one(dist: Distribution, wheels_dir: Path, work_dir: Path) -> LocalBuild:
    path = dist.source.local_path
    if path is None or not path.exists():
        where = dist.source.url or "an unknown place"
        raise ResolverError(
            f"{dist.name} is a local package from {where}, which is not on this machine: "
            "lock where its source is, or install it from an index"
        )
    work_dir.mkdir(parents=True, exist_ok=True)
    is_wheel = path.is_file() and path.name.endswith(".whl")
    wheel = path if is_wheel else _uv_build(path, work_dir / "wheel", "--wheel")
    requires = _wheel_requires(wheel)
    _, version, _, tags = parse_wheel_filename(wheel.name)
    pure = all(tag.abi == "none" and tag.platform == "any" for tag in tags)
    if pure:
        shipped = wheel
    elif path.is_file() and not path.name.endswith(".whl"):
        shipped = path  # already an sdist
    elif path.is_dir():
        shipped = _uv_build(path, work_dir / "sdist", "--sdist")
    else:
        raise ResolverError(f"{dist.name}: {path.name} is a compiled wheel for another platform and has no source")
    wheels_dir.mkdir(parents=True, exist_ok=True)
    destination = wheels_dir / shipped.name
    shutil.copyfile(shipped, destination)
    data = destination.read_bytes()
    if not pure:
        _, version = parse_sdist_filename(shipped.name)
    artifact = LocalArtifact(
        name=str(canonicalize_name(dist.name)),
        version=str(version),
        path=f"wheels/{destination.name}",
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        is_sdist=not pure,
    )
    return LocalBuild(artifact=artifact, requires=requires, source=str(path))


def _uv_build(source: Path, out_dir: Path, kind: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH}
    command = [uv_bin(), "build", kind, "--quiet", "--out-dir", str(out_dir), str(source)]
    completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    built = sorted(out_dir.glob("*.whl" if kind == "--wheel" else "*.tar.gz"))
    if completed.returncode != 0 or not built:
        last = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        raise ResolverError(f"cannot build the local package at {source}: {last}")
    return built[0]


def _wheel_requires(wheel: Path) -> tuple[str, ...]:
    with zipfile.ZipFile(wheel) as archive:
        names = [name for name in archive.namelist() if name.endswith(".dist-info/METADATA")]
        if not names:
            raise ResolverError(f"{wheel.name} has no METADATA")
        message = Parser().parsestr(archive.read(names[0]).decode())
    return tuple(message.get_all("Requires-Dist") or ())
