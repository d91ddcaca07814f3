"""Which releases of a package have an artifact for the target: asked of the index (PEP 691 JSON).

Only used when uv reports a resolution failure, to tell "this pin has no build for Linux" from a conflict.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

from packaging.tags import Tag
from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion, Version

from rawvm_resolver.errors import ResolverError
from rawvm_resolver.index_http import RETRY_DELAYS, TransportError, client

PYPI_SIMPLE = "https://pypi.org/simple"
_JSON = "application/vnd.pypi.simple.v1+json"


@dataclass(frozen=True)
class IndexFile:
    filename: str
    version: Version
    tags: frozenset[Tag]  # empty for an sdist
    url: str = ""  # where the index serves it
    metadata: bool = False  # the index serves its core metadata at url + ".metadata" (PEP 658 / 714)

    @property
    def is_sdist(self) -> bool:
        return not self.tags


@functools.lru_cache(maxsize=4096)
def index_files(name: str, index_url: str = PYPI_SIMPLE) -> tuple[IndexFile, ...]:
    """Every non-yanked wheel and sdist of ``name`` on the index; () when the index does not know it.

    Cached for the process: one lock asks again on every adjustment, and a corpus run asks for the same names.
    """
    if not index_url.startswith(("https://", "http://")):
        raise ResolverError(f"index {index_url!r} is not an http(s) URL")
    data = _fetch_json(f"{index_url.rstrip('/')}/{name}/", f"cannot ask {index_url} about {name}")
    if data is None:
        return ()
    files: list[IndexFile] = []
    entries = data.get("files")
    for entry in entries if isinstance(entries, list) else []:
        if entry.get("yanked"):
            continue
        parsed = parse_filename(str(entry.get("filename", "")))
        if parsed is not None:
            metadata = bool(entry.get("core-metadata") or entry.get("dist-info-metadata"))
            url = urllib.parse.urljoin(f"{index_url.rstrip('/')}/{name}/", str(entry.get("url", "")))
            files.append(dataclasses.replace(parsed, url=url, metadata=metadata))
    return tuple(files)


def _fetch_json(url: str, failure: str) -> dict[str, object] | None:
    """The index's JSON page; None on 404. Transient failures (DNS, resets, timeouts, 5xx) are retried."""
    for delay in (*RETRY_DELAYS, None):
        try:
            response = client().get(url, headers={"Accept": _JSON})
        except (TransportError, OSError) as exc:
            if delay is None:
                raise ResolverError(f"{failure}: {exc}") from exc
        else:
            if response.status == 404:
                return None
            if response.status >= 500 and delay is not None:
                time.sleep(delay)
                continue
            if response.status != 200:
                raise ResolverError(f"{failure}: HTTP {response.status}")
            try:
                data = json.loads(response.body)
            except ValueError as exc:
                raise ResolverError(f"{failure}: the index answered something that is not JSON ({exc})") from exc
            return data if isinstance(data, dict) else {}
        time.sleep(delay)
    raise AssertionError("unreachable")  # the last delay is None: the loop returns or raises


def parse_filename(filename: str) -> IndexFile | None:
    try:
        if filename.endswith(".whl"):
            _, version, _, tags = parse_wheel_filename(filename)
            return IndexFile(filename, version, frozenset(tags))
        if filename.endswith((".tar.gz", ".zip")):
            _, version = parse_sdist_filename(filename)
            return IndexFile(filename, version, frozenset())
    except (InvalidWheelFilename, InvalidSdistFilename, InvalidVersion):
        return None
    return None


def artifact_kind(files: Sequence[IndexFile], version: str, accepted: frozenset[Tag]) -> str:
    """ "wheel" when the target has a wheel of ``version``, "sdist" when only an sdist, "" when neither."""
    try:
        wanted = Version(version)
    except InvalidVersion:
        return ""
    matching = [file for file in files if file.version == wanted]
    if any(file.tags & accepted for file in matching):
        return "wheel"
    if any(file.is_sdist for file in matching):
        return "sdist"
    return ""


def nearest_version(files: Sequence[IndexFile], version: str, accepted: frozenset[Tag]) -> str:
    """The release closest to ``version`` with a wheel for the target (else an sdist); "" when none.

    Closest: the lowest newer final release, else the highest older one (upgrades fix more than they break).
    """
    pin = Version(version)
    for want_wheel in (True, False):
        usable = sorted(
            {
                file.version
                for file in files
                if not file.version.is_prerelease and ((file.tags & accepted) if want_wheel else file.is_sdist)
            }
        )
        newer = [candidate for candidate in usable if candidate > pin]
        older = [candidate for candidate in usable if candidate < pin]
        if newer:
            return str(newer[0])
        if older:
            return str(older[-1])
    return ""


def platforms_offered(files: Sequence[IndexFile]) -> list[str]:
    """The platform tags the newest release ships wheels for (for messages)."""
    if not files:
        return []
    newest = max(file.version for file in files)
    return sorted({tag.platform for file in files if file.version == newest for tag in file.tags})
