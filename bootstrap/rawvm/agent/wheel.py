"""The rawvm-agent wheel every machine installs.

From a workspace checkout the wheel is built from the agent's source with ``uv build`` (hatchling, with
``SOURCE_DATE_EPOCH`` fixed so the same source gives the same bytes) and cached by a hash of that source and
the workspace lock. From an installed (non-workspace) rawvm the wheel is re-packed from the installed
distribution's RECORD. Either way ``agent-requirements.txt`` (``rawvm.agent.requirements``: the agent's
dependencies pinned with sha256 hashes) is made and cached beside the wheel, and travels with it.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import shutil
import tempfile
import tomllib
import zipfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import rawvm_agent

from rawvm.agent import requirements
from rawvm.errors import RawvmError

DISTRIBUTION = requirements.DISTRIBUTION
# 1980-01-01, the earliest time a zip entry can hold: no build time leaks into the wheel.
SOURCE_DATE_EPOCH = "315532800"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
# Bump when the way wheels are made changes, so cached wheels are rebuilt.
_BUILDER_VERSION = "2"  # 2: agent-requirements.txt beside the wheel
_SKIP_DIRS = {"__pycache__", "dist", "build", ".venv", ".mypy_cache", ".ruff_cache", ".pytest_cache"}


def cache_dir() -> Path:
    """Where built wheels are kept: ``$RAWVM_CACHE_DIR``, else ``$XDG_CACHE_HOME/rawvm``, else ``~/.cache``."""
    if env := os.environ.get("RAWVM_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rawvm"


def agent_source_dir() -> Path | None:
    """The agent's project directory (holding its pyproject.toml) when rawvm runs from a workspace checkout."""
    project = Path(rawvm_agent.__file__).resolve().parent.parent
    pyproject = project / "pyproject.toml"
    if not pyproject.is_file():
        return None
    try:
        name = tomllib.loads(pyproject.read_text()).get("project", {}).get("name")
    except tomllib.TOMLDecodeError:
        return None
    return project if name == DISTRIBUTION else None


def source_files(project: Path) -> list[Path]:
    """The files a build reads, sorted: everything under the project but caches, builds and hidden dirs."""
    found: list[Path] = []
    for root, dirs, files in os.walk(project):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        found.extend(Path(root) / f for f in files if not f.endswith((".pyc", ".pyo")) and not f.startswith("."))
    return sorted(found, key=lambda p: p.relative_to(project).as_posix())


def source_hash(project: Path) -> str:
    """What the cached wheel and its requirements are made from: the agent's files and the workspace lock."""
    digest = hashlib.sha256(f"rawvm-agent-wheel {_BUILDER_VERSION}\n".encode())
    lock = project.parent / "uv.lock"
    for path in [*source_files(project), *([lock] if lock.is_file() else [])]:
        name = "../uv.lock" if path == lock else path.relative_to(project).as_posix()
        digest.update(name.encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def build_agent_wheel(out_dir: Path | None = None) -> Path:
    """Path of the rawvm-agent wheel (built or re-packed, cached), with ``agent-requirements.txt`` beside it
    (``requirements.requirements_path``); both copied into ``out_dir`` when given."""
    project = agent_source_dir()
    if project is not None:
        wheel = _cached(
            f"src-{source_hash(project)}",
            lambda tmp: _uv_build(project, tmp),
            lambda _wheel, out: requirements.export_locked(project, out),
        )
    else:
        dist = metadata.distribution(DISTRIBUTION)
        key = f"dist-{dist.version}-{_record_hash(dist)}"
        wheel = _cached(key, lambda tmp: repack_installed(dist, tmp), requirements.compile_for)
    if out_dir is None:
        return wheel
    out_dir.mkdir(parents=True, exist_ok=True)
    for source in (wheel, requirements.requirements_path(wheel)):
        target = out_dir / source.name
        if not target.exists() or target.read_bytes() != source.read_bytes():
            shutil.copyfile(source, target)
    return out_dir / wheel.name


def _cached(key: str, build: Callable[[Path], Path], pin: Callable[[Path, Path], None]) -> Path:
    """The slot's wheel, made by ``build`` (in a scratch dir) and ``pin`` (its requirements) when missing."""
    slot = cache_dir() / "agent-wheels" / key
    existing = sorted(slot.glob("*.whl")) if slot.is_dir() else []
    if existing and requirements.requirements_path(existing[0]).is_file():
        return existing[0]
    slot.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=slot.parent, prefix=f".{key}-") as tmp:
        wheel = build(Path(tmp))
        staged = Path(tmp) / "slot"
        staged.mkdir()
        wheel = wheel.rename(staged / wheel.name)
        pin(wheel, requirements.requirements_path(wheel))
        requirements.check(requirements.requirements_path(wheel), wheel)
        try:
            staged.rename(slot)  # atomic: a concurrent build of the same key simply loses the race
        except OSError:
            if not any(slot.glob("*.whl")):
                raise
    return sorted(slot.glob("*.whl"))[0]


def _uv_build(project: Path, tmp: Path) -> Path:
    out = tmp / "out"
    env = {**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH}
    cmd = ["build", "--wheel", "--quiet", "--out-dir", str(out), str(project)]
    requirements.run_uv(cmd, "building the rawvm-agent wheel", env=env)
    wheels = sorted(out.glob("*.whl"))
    if len(wheels) != 1:
        raise RawvmError(f"building the rawvm-agent wheel gave {len(wheels)} wheels in {out}, expected 1")
    return wheels[0]


def _record_hash(dist: metadata.Distribution) -> str:
    return hashlib.sha256((dist.read_text("RECORD") or "").encode()).hexdigest()[:32]


def repack_installed(dist: metadata.Distribution, out_dir: Path) -> Path:
    """Re-pack an installed (non-editable) distribution as a wheel, from the files its RECORD lists.

    Scripts outside site-packages, bytecode and installer-specific files are left out; the wheel's
    ``entry_points.txt`` recreates the console scripts when it is installed.
    """
    name, version = dist.metadata["Name"].replace("-", "_"), dist.version
    dist_info = f"{name}-{version}.dist-info"
    installer_only = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json", "uv_build.json", "uv_cache.json"}
    scripts = {ep.name for ep in dist.entry_points if ep.group in {"console_scripts", "gui_scripts"}}
    entries: dict[str, bytes] = {}
    for file in dist.files or []:
        rel = file.as_posix()
        if rel.startswith("..") or rel.endswith((".pyc", ".pth")) or "__pycache__" in rel:
            continue
        if file.parts[0] in {"bin", "Scripts"} and file.name.removesuffix(".exe") in scripts:
            continue  # an installed launcher (``pip install --target``): entry_points.txt makes it again
        if rel.startswith(f"{dist_info}/") and rel.split("/", 1)[1] in installer_only:
            continue
        entries[rel] = Path(str(file.locate())).read_bytes()
    if not any(rel.endswith(".py") and not rel.startswith(dist_info) for rel in entries):
        raise RawvmError(
            f"{DISTRIBUTION} {version} is installed without its files (an editable install outside a checkout?): "
            "reinstall rawvm from a wheel or run it from the source checkout"
        )
    entries[f"{dist_info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: rawvm.agent.wheel\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    wheel = out_dir / f"{name}-{version}-py3-none-any.whl"
    write_wheel(wheel, entries, dist_info)
    return wheel


def write_wheel(path: Path, entries: dict[str, bytes], dist_info: str) -> None:
    """A wheel with fixed timestamps and sorted members, plus its RECORD."""
    record_name = f"{dist_info}/RECORD"
    rows = []
    for rel in sorted(entries):
        digest = base64.urlsafe_b64encode(hashlib.sha256(entries[rel]).digest()).rstrip(b"=").decode()
        rows.append((rel, f"sha256={digest}", str(len(entries[rel]))))
    rows.append((record_name, "", ""))
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for rel in [*sorted(entries), record_name]:
            info = zipfile.ZipInfo(rel, date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, entries[rel] if rel != record_name else buf.getvalue().encode())
