"""Local, VCS and editable sources that are not on this machine: the index release that replaces each, and why.

``pip freeze`` inside a conda environment lists conda-built packages as ``name @ file:///…/croot/…/work``;
poetry, pip and uv list cached wheels by their cache path; ``-e git+ssh://…`` names a repository the VM may
not reach. None of these paths exist where the lock is made (or on the VM), but the project almost always has a
release of the same name on the index, so that is what the lock takes: at the version the source shows (a
wheel or sdist file name, the installed metadata, a ``#egg=name-version`` fragment, a pip freeze comment),
else the newest that fits.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlparse

from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)

from rawvm_resolver.environment import Distribution
from rawvm_resolver.sources import is_forge_download

# Where a path comes from, by the marks each tool leaves in it (first match wins).
_ORIGINS = (
    (
        re.compile(r"/croots?/|/conda-bld/|/feedstock_root/|/tmp/build/|/opt/concourse/|/recipes/ci/|/ci_\d+/"),
        "conda-built package",
    ),
    (re.compile(r"pypoetry/(artifacts|cache)"), "poetry cache wheel"),
    (re.compile(r"Caches/pip/|\.cache/pip/"), "pip cache wheel"),
    (re.compile(r"Caches/uv/|\.cache/uv/"), "uv cache wheel"),
)


def known_version(dist: Distribution) -> tuple[str, str]:
    """(version, where it was read) for a source that is not on this machine; ("", "") when nothing says."""
    if dist.version:
        return dist.version, "the version the source records"
    url = dist.source.url
    fragment = urlparse(url).fragment
    egg = re.search(r"(?:^|&)egg=([^&]+)", fragment)
    if egg and "-" in egg.group(1):
        name, _, version = egg.group(1).rpartition("-")
        if canonicalize_name(name) == dist.name and re.fullmatch(r"\d[\w.+!]*", version):
            return version, "its #egg= fragment"
    filename = unquote(urlparse(url).path).rstrip("/").rsplit("/", 1)[-1]
    try:
        if filename.endswith(".whl"):
            wheel_name, wheel_version, _, _ = parse_wheel_filename(filename)
            if wheel_name == dist.name:
                return str(wheel_version), "the wheel file name"
        elif filename.endswith((".tar.gz", ".zip")):
            sdist_name, sdist_version = parse_sdist_filename(filename)
            if sdist_name == dist.name:
                return str(sdist_version), "the sdist file name"
    except (InvalidWheelFilename, InvalidSdistFilename):
        pass
    return "", ""


def origin_of(dist: Distribution) -> str:
    """What kind of source this is, in words, for the report."""
    if dist.source.kind == "vcs":
        return "VCS source"
    if is_forge_download(dist.source.url):
        return "code-forge download"
    for pattern, words in _ORIGINS:
        if pattern.search(dist.source.url):
            return words
    return "editable source" if dist.source.kind == "editable" else "local package"


def short_url(url: str, limit: int = 72) -> str:
    """The URL as the report shows it: long build paths cut in the middle."""
    return url if len(url) <= limit else f"{url[: limit // 2 - 2]}…{url[-(limit // 2 - 1) :]}"


def index_reason(dist: Distribution, version: str, where: str) -> str:
    source = f"{origin_of(dist)} {short_url(dist.source.url)}"
    release = f"the index release {version} (version from {where})" if version else "the newest index release"
    tail = "; pass --keep-vcs to keep the URL if the VM can reach it" if _keepable(dist) else ""
    return f"{source} is not on this machine: {release} of the same name{tail}"


def missing_reason(dist: Distribution) -> str:
    where = "lock where its source is" + (", or pass --keep-vcs if the VM can reach it" if _keepable(dist) else "")
    return (
        f"WARNING: {origin_of(dist)} {short_url(dist.source.url)} is not on this machine and the index has no "
        f"release of {dist.name}: dropped ({where})"
    )


def _keepable(dist: Distribution) -> bool:
    return dist.source.kind == "vcs" or is_forge_download(dist.source.url)


def local_path_exists(dist: Distribution) -> bool:
    """Whether the source is here to build: a file, or a directory that is a Python project."""
    path = dist.source.local_path
    if path is None or not path.exists():
        return False
    return path.is_file() or any((path / name).is_file() for name in ("pyproject.toml", "setup.py", "setup.cfg"))
