"""Which uv wheel a machine installs: exact PyPI file URLs and sha256 per architecture (no ``curl | sh``).

The user-data embeds both the x86_64 and the aarch64 wheel; the machine picks by ``uname -m``. The version is
the host's uv by default, so the VM runs the uv the lock was made with. PyPI files never change once uploaded,
so a version found once is cached on disk for good (``~/.cache/rawvm/uv-wheels.json``) and works offline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

from packaging.utils import InvalidWheelFilename, parse_wheel_filename

from rawvm.errors import RawvmError

PYPI_JSON_URL = "https://pypi.org/pypi"
ARCHES = ("x86_64", "aarch64")
_MANYLINUX = re.compile(r"manylinux_(\d+)_(\d+)_(\w+)$")
_LEGACY_MANYLINUX = {"manylinux2014": (2, 17), "manylinux2010": (2, 12), "manylinux1": (2, 5)}

Fetch = Callable[[str], bytes]


@dataclass(frozen=True)
class UvArtifact:
    """One wheel file on the index."""

    filename: str
    url: str
    sha256: str


@dataclass(frozen=True)
class UvWheel:
    """uv's manylinux wheels for the two architectures rawvm launches."""

    version: str
    x86_64: UvArtifact
    aarch64: UvArtifact

    def for_arch(self, arch: str) -> UvArtifact:
        if arch in ("x86_64", "amd64"):
            return self.x86_64
        if arch in ("aarch64", "arm64"):
            return self.aarch64
        raise RawvmError(f"no uv wheel for architecture {arch!r}: rawvm launches x86_64 or aarch64 machines")


def default_cache_path() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "rawvm" / "uv-wheels.json"


def host_uv_version() -> str:
    """The uv on this machine (``uv --version``), else the installed ``uv`` Python package's version."""
    exe = shutil.which("uv")
    if exe:
        try:
            out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        match = re.match(r"uv (\d+\.\d+\.\d+\S*)", out.strip())
        if match:
            return match.group(1)
    try:
        return metadata.version("uv")
    except metadata.PackageNotFoundError:
        raise RawvmError("cannot tell which uv to install on the machines: uv is not on PATH; install uv") from None


def _glibc_floor(platform: str, arch: str) -> tuple[int, int] | None:
    """The glibc a manylinux platform tag needs, or None when the tag is not manylinux for ``arch``."""
    match = _MANYLINUX.match(platform)
    if match and match.group(3) == arch:
        return int(match.group(1)), int(match.group(2))
    legacy, _, tag_arch = platform.partition("_")
    if legacy in _LEGACY_MANYLINUX and tag_arch == arch:
        return _LEGACY_MANYLINUX[legacy]
    return None


def pick_wheel(files: Sequence[Mapping[str, Any]], arch: str, base_url: str) -> UvArtifact:
    """The manylinux wheel for ``arch`` needing the oldest glibc (it runs on the most images).

    ``files`` are PyPI JSON API file entries; relative URLs (mirrors serve them) are resolved against
    ``base_url``.
    """
    best: tuple[tuple[int, int], UvArtifact] | None = None
    for entry in files:
        filename = str(entry.get("filename", ""))
        if entry.get("yanked") or not filename.endswith(".whl"):
            continue
        try:
            tags = parse_wheel_filename(filename)[3]
        except InvalidWheelFilename:
            continue
        floors = [f for f in (_glibc_floor(tag.platform, arch) for tag in tags) if f is not None]
        if not floors:
            continue
        artifact = UvArtifact(filename, urljoin(base_url, str(entry["url"])), str(entry["digests"]["sha256"]))
        if best is None or min(floors) < best[0]:
            best = (min(floors), artifact)
    if best is None:
        raise RawvmError(f"PyPI lists no manylinux {arch} wheel for this uv version; pick another uv version")
    return best[1]


def _http_get(url: str) -> bytes:
    if not url.startswith(("https://", "http://")):
        raise ValueError(f"not an http(s) URL: {url}")
    request = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "rawvm"})  # noqa: S310
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 (scheme checked above)
        body: bytes = response.read()
        return body


def _release_files(version: str, pypi_url: str, fetch: Fetch) -> tuple[list[Mapping[str, Any]], str]:
    """The files of uv ``version`` and the URL they are relative to.

    Tries the per-release endpoint first (small); some mirrors only serve the project endpoint.
    """
    release_url = f"{pypi_url}/uv/{version}/json"
    try:
        data = json.loads(fetch(release_url))
        return list(data["urls"]), release_url
    except urllib.error.HTTPError as exc:
        if exc.code != 404:
            raise
    project_url = f"{pypi_url}/uv/json"
    releases = json.loads(fetch(project_url)).get("releases", {})
    if version not in releases:
        raise RawvmError(f"uv {version} is not on the package index; pick a released uv version")
    return list(releases[version]), project_url


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _from_cache(entry: Any) -> UvWheel | None:
    try:
        return UvWheel(
            version=entry["version"],
            x86_64=UvArtifact(**entry["x86_64"]),
            aarch64=UvArtifact(**entry["aarch64"]),
        )
    except (KeyError, TypeError):
        return None


def find_uv_wheel(
    version: str | None = None,
    *,
    cache_path: Path | None = None,
    pypi_url: str = PYPI_JSON_URL,
    fetch: Fetch = _http_get,
) -> UvWheel:
    """uv ``version``'s wheels (default: the host's uv), from the disk cache or PyPI's JSON API."""
    version = version or host_uv_version()
    cache_path = cache_path or default_cache_path()
    cache = _read_cache(cache_path)
    cached = _from_cache(cache.get(version))
    if cached is not None:
        return cached
    try:
        files, base_url = _release_files(version, pypi_url.rstrip("/"), fetch)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise RawvmError(
            f"cannot look up uv {version}'s wheels: {pypi_url} unreachable ({exc}) and nothing cached in "
            f"{cache_path}; connect once to fill the cache"
        ) from None
    wheel = UvWheel(version, pick_wheel(files, "x86_64", base_url), pick_wheel(files, "aarch64", base_url))
    cache[version] = asdict(wheel)
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        tmp.replace(cache_path)
    except OSError:
        pass  # a read-only cache only costs a lookup next time
    return wheel
