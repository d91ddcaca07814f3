"""The environment bundle (Contract 1) as data and rules: its errors, the ``rawvm-env.toml`` manifest, safe
paths, file hashes, and unpacking the code archive.

A leaf of the install: installer.py (which does the install), fetch.py and conda_install.py build on it, and
bootstrap reads bundles with the same rules (``parse_manifest``, ``unpack_code``).
"""

from __future__ import annotations

import hashlib
import tarfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

MANIFEST = "rawvm-env.toml"
KINDS = frozenset({"pylock", "wheel", "sdist", "code", "conda-lock"})


class InstallError(Exception):
    """The environment could not be installed; the message is one line for the status and the log."""


class BundleError(InstallError):
    """The bundle failed verification (sha256 mismatch, unlisted or missing file); nothing was installed."""


@dataclass(frozen=True)
class ManifestFile:
    path: str
    sha256: str
    kind: str


@dataclass(frozen=True)
class Manifest:
    python: str
    index_url: str
    extra_index_urls: tuple[str, ...]
    files: tuple[ManifestFile, ...]
    build_constraints: tuple[str, ...] = ()  # requirements for sdist build environments (setuptools<82)

    def of_kind(self, kind: str) -> list[ManifestFile]:
        return [f for f in self.files if f.kind == kind]


def sha256_file(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def parse_manifest(text: str) -> Manifest:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BundleError(f"{MANIFEST} is not valid TOML: {exc}") from None
    if raw.get("format") != 1:
        raise BundleError(f"{MANIFEST}: unsupported format {raw.get('format')!r} (this agent reads format 1)")
    install = raw.get("install", {})
    files = []
    for entry in raw.get("files", []):
        path, sha, kind = entry.get("path", ""), entry.get("sha256", ""), entry.get("kind", "")
        if kind not in KINDS:
            raise BundleError(f"{MANIFEST}: file {path!r} has unknown kind {kind!r}")
        files.append(ManifestFile(path=safe_relpath(path), sha256=str(sha).lower(), kind=kind))
    return Manifest(
        python=str(raw.get("target", {}).get("python", "")),
        index_url=str(install.get("index_url", "")),
        extra_index_urls=tuple(install.get("extra_index_urls", ())),
        files=tuple(files),
        build_constraints=tuple(str(line) for line in install.get("build_constraints", ())),
    )


def safe_relpath(path: str) -> str:
    """A bundle path must stay inside the bundle: relative, no ``..``, no empty parts."""
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or any(part in ("..", "") for part in path.split("/")):
        raise BundleError(f"bundle path {path!r} is not a plain relative path")
    return str(pure)


def unpack_code(archive: Path, dest: Path) -> None:
    """Unpack the project code, refusing absolute paths, ``..``, links and devices.

    tarfile's ``data`` filter does that where it exists (3.11.4+); older Pythons, such as Debian 12's 3.11.2 on a
    VM, get the same rule from :func:`_checked_members`.
    """
    try:
        with tarfile.open(archive, "r:gz") as tar:
            # The archive stores mtime 0 (equal inputs, equal bytes); unpacked, the files are new now. A file of
            # 1970 shows as "56y ago" in JupyterLab, and a later same-size edit could look older than its .pyc.
            now = time.time()
            members = tar.getmembers()
            for member in members:
                member.mtime = now
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, members=members, filter="data")
            else:
                tar.extractall(dest, members=_checked_members(tar))  # noqa: S202 - members are checked
    except (tarfile.TarError, OSError) as exc:
        raise InstallError(f"cannot unpack {archive.name}: {exc}") from None


def _checked_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    for member in members:
        name = PurePosixPath(member.name)
        if not (member.isfile() or member.isdir()):
            raise InstallError(f"code archive member {member.name!r} is not a regular file or directory")
        if name.is_absolute() or ".." in name.parts:
            raise InstallError(f"code archive member {member.name!r} points outside the work directory")
        member.mode &= 0o755  # no setuid/setgid bits from an archive
    return members
