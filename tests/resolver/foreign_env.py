"""Build a FOREIGN environment (macOS arm64 by default) here, as dist-info trees, from real wheels on PyPI.

uv resolves the requested packages for the foreign platform (``uv pip compile --python-platform``), which gives
the exact wheel each package would install there. Each dist-info gets that wheel's real METADATA (PEP 658
``.metadata`` file from PyPI) and a WHEEL file carrying the wheel's real tags. Everything downloaded is cached
under ~/.cache/rawvm-tests (RAWVM_TEST_CACHE), so reruns are offline-fast.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tomllib
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name
from uv import find_uv_bin

from tests.helpers.network import with_retries

CACHE = Path(os.environ.get("RAWVM_TEST_CACHE", "~/.cache/rawvm-tests")).expanduser()


@dataclass(frozen=True)
class ForeignPackage:
    name: str
    version: str
    wheel_filename: str  # "" when the platform has only an sdist
    metadata: str  # the wheel's own METADATA
    wheel: str  # the wheel's own WHEEL file ("" for an sdist-only package)


def resolve_foreign(
    requested: list[str], *, python: str = "3.11", platform: str = "aarch64-apple-darwin"
) -> list[dict[str, Any]]:
    """uv's pylock packages for the foreign platform, cached by input."""
    key = hashlib.sha256(json.dumps([requested, python, platform]).encode()).hexdigest()[:16]
    cached = CACHE / "resolutions" / f"{key}.toml"
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        out = cached.parent / f"{key}-{os.getpid()}"
        out.mkdir(exist_ok=True)
        work = out / "requirements.in"
        work.write_text("\n".join(requested) + "\n")
        command = [
            find_uv_bin(),
            "pip",
            "compile",
            str(work),
            "--python-platform",
            platform,
            "--python-version",
            python,
            "--format",
            "pylock.toml",
            "-o",
            str(out / "pylock.toml"),
            "--quiet",
            "--no-header",
        ]
        # A laptop on macOS 14 (Sonoma): uv reads the macOS version from MACOSX_DEPLOYMENT_TARGET.
        env = {**os.environ, "MACOSX_DEPLOYMENT_TARGET": "14.0"}
        with_retries(lambda: subprocess.run(command, check=True, capture_output=True, env=env))
        (out / "pylock.toml").rename(cached)
    return list(tomllib.loads(cached.read_text())["packages"])


class _RangeFile(io.RawIOBase):
    """A remote file read with HTTP Range requests, so zipfile reads one member without the whole wheel."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.position = 0
        request = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(request, timeout=120) as response:
            self.size = int(response.headers["Content-Length"])

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = base + offset
        return self.position

    def read(self, size: int = -1) -> bytes:
        end = self.size if size < 0 else min(self.size, self.position + size)
        if end <= self.position:
            return b""
        request = urllib.request.Request(self.url, headers={"Range": f"bytes={self.position}-{end - 1}"})
        with urllib.request.urlopen(request, timeout=120) as response:
            data: bytes = response.read()
        self.position += len(data)
        return data


def _read_member(url: str, suffix: str) -> str:
    with zipfile.ZipFile(_RangeFile(url)) as archive:
        name = next(n for n in archive.namelist() if n.count("/") == 1 and n.endswith(f".dist-info/{suffix}"))
        return archive.read(name).decode()


def _wheel_member(url: str, suffix: str) -> str:
    """The text of the wheel's ``*.dist-info/<suffix>`` (cached), read with HTTP ranges."""
    digest = hashlib.sha256(f"{url}#{suffix}".encode()).hexdigest()
    path = CACHE / "wheel-files" / digest[:2] / digest
    if path.exists():
        return path.read_text()
    text = with_retries(lambda: _read_member(url, suffix))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}")
    tmp.write_text(text)
    tmp.rename(path)
    return text


def _package(entry: dict[str, Any]) -> ForeignPackage:
    name, version = str(entry["name"]), str(entry["version"])
    wheels = entry.get("wheels", [])
    if not wheels:
        return ForeignPackage(name, version, "", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", "")
    url = str(wheels[0]["url"])
    return ForeignPackage(
        name, version, url.rsplit("/", 1)[-1], _wheel_member(url, "METADATA"), _wheel_member(url, "WHEEL")
    )


def foreign_packages(requested: list[str], **kwargs: str) -> list[ForeignPackage]:
    entries = resolve_foreign(requested, **kwargs)
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(_package, entries))


def write_dist_info(
    site: Path, package: ForeignPackage, *, requested: bool, direct_url: dict[str, Any] | None = None
) -> Path:
    normalized = str(canonicalize_name(package.name)).replace("-", "_")
    dist_info = site / f"{normalized}-{package.version}.dist-info"
    dist_info.mkdir(parents=True, exist_ok=True)
    (dist_info / "METADATA").write_text(package.metadata)
    if package.wheel:
        (dist_info / "WHEEL").write_text(package.wheel)
    (dist_info / "INSTALLER").write_text("pip\n")
    (dist_info / "RECORD").write_text("")
    if requested:
        (dist_info / "REQUESTED").write_text("")
    if direct_url is not None:
        (dist_info / "direct_url.json").write_text(json.dumps(direct_url))
    return dist_info


def build_venv(
    root: Path,
    requested: list[str],
    *,
    python: str = "3.11",
    full_python: str = "3.11.9",
    platform: str = "aarch64-apple-darwin",
) -> Path:
    """A venv-shaped foreign environment at ``root``; returns its site-packages directory."""
    site = root / "lib" / f"python{python}" / "site-packages"
    site.mkdir(parents=True, exist_ok=True)
    (root / "pyvenv.cfg").write_text(f"home = /opt/homebrew/bin\nversion_info = {full_python}\n")
    wanted = {
        str(canonicalize_name(line.split("=")[0].split("[")[0].split("<")[0].split(">")[0])) for line in requested
    }
    for package in foreign_packages(requested, python=python, platform=platform):
        write_dist_info(site, package, requested=str(canonicalize_name(package.name)) in wanted)
    return site


def add_editable(site: Path, project: Path, name: str, version: str, requires: list[str]) -> None:
    """A real local hatchling project at ``project`` and its editable install record in ``site``."""
    module = name.replace("-", "_")
    (project / module).mkdir(parents=True, exist_ok=True)
    (project / module / "__init__.py").write_text(f'"""{name}: a local package."""\n\nVALUE = 42\n')
    deps = ", ".join(json.dumps(req) for req in requires)
    (project / "pyproject.toml").write_text(
        f'[project]\nname = "{name}"\nversion = "{version}"\ndependencies = [{deps}]\n\n'
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
    )
    metadata = f"Metadata-Version: 2.4\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {req}\n" for req in requires
    )
    wheel = "Wheel-Version: 1.0\nGenerator: hatchling\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    write_dist_info(
        site,
        ForeignPackage(name, version, f"{module}-{version}-py3-none-any.whl", metadata, wheel),
        requested=True,
        direct_url={"url": project.resolve().as_uri(), "dir_info": {"editable": True}},
    )
