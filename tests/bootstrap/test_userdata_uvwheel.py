"""Finding uv's wheels on PyPI: the selection rule, the disk cache, offline errors, and the real files."""

from __future__ import annotations

import hashlib
import io
import json
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import pytest
from rawvm.agent.uvwheel import find_uv_wheel, host_uv_version, pick_wheel
from rawvm.errors import RawvmError


def _entry(filename: str, sha: str = "00" * 32, **extra: Any) -> dict[str, Any]:
    return {"filename": filename, "url": f"../../packages/{filename}", "digests": {"sha256": sha}, **extra}


FILES = [
    _entry("uv-1.0.0-py3-none-manylinux_2_28_aarch64.whl", "aa" * 32),
    _entry("uv-1.0.0-py3-none-manylinux_2_17_aarch64.manylinux2014_aarch64.musllinux_1_1_aarch64.whl", "bb" * 32),
    _entry("uv-1.0.0-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", "cc" * 32),
    _entry("uv-1.0.0-py3-none-musllinux_1_1_x86_64.whl", "dd" * 32),
    _entry("uv-1.0.0-py3-none-macosx_11_0_arm64.whl", "ee" * 32),
    _entry("uv-1.0.0.tar.gz", "ff" * 32),
]


def test_picks_the_manylinux_wheel_needing_the_oldest_glibc() -> None:
    base = "https://pypi.org/pypi/uv/json"  # mirrors give URLs relative to the JSON document
    aarch64 = pick_wheel(FILES, "aarch64", base)
    assert aarch64.sha256 == "bb" * 32
    assert aarch64.url.startswith("https://pypi.org/packages/uv-1.0.0-py3-none-manylinux_2_17_aarch64")
    assert pick_wheel(FILES, "x86_64", base).sha256 == "cc" * 32


def test_yanked_and_musl_only_wheels_are_skipped() -> None:
    files = [_entry("uv-1.0.0-py3-none-musllinux_1_1_x86_64.whl"), _entry(FILES[2]["filename"], yanked=True)]
    with pytest.raises(RawvmError, match="no manylinux x86_64 wheel"):
        pick_wheel(files, "x86_64", "https://pypi.org/")


class _FakeIndex:
    """PyPI's JSON API shape, served from memory; counts requests. Only for the cache/offline rules."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.online = True

    def __call__(self, url: str) -> bytes:
        self.calls.append(url)
        if not self.online:
            raise urllib.error.URLError("network unreachable")
        if url.endswith("/uv/1.0.0/json"):
            return json.dumps({"urls": FILES}).encode()
        raise urllib.error.HTTPError(url, 404, "not found", None, None)  # type: ignore[arg-type]


def test_cache_serves_a_known_version_offline(tmp_path: Path) -> None:
    index, cache = _FakeIndex(), tmp_path / "uv-wheels.json"
    first = find_uv_wheel("1.0.0", cache_path=cache, fetch=index)
    assert json.loads(cache.read_text())["1.0.0"]["x86_64"]["sha256"] == "cc" * 32
    index.online = False
    assert find_uv_wheel("1.0.0", cache_path=cache, fetch=index) == first
    assert len(index.calls) == 1


def test_offline_with_nothing_cached_is_one_clear_error(tmp_path: Path) -> None:
    index = _FakeIndex()
    index.online = False
    with pytest.raises(RawvmError) as info:
        find_uv_wheel("1.0.0", cache_path=tmp_path / "c.json", fetch=index)
    assert "unreachable" in str(info.value) and "nothing cached" in str(info.value)


def test_unknown_version_is_a_clear_error(tmp_path: Path) -> None:
    index = _FakeIndex()
    # the per-release endpoint 404s, the project endpoint has no such release
    index_calls: list[str] = []

    def fetch(url: str) -> bytes:
        index_calls.append(url)
        if url.endswith("/uv/json"):
            return json.dumps({"releases": {"1.0.0": FILES}}).encode()
        return index(url)

    with pytest.raises(RawvmError, match=r"uv 9\.9\.9 is not on the package index"):
        find_uv_wheel("9.9.9", cache_path=tmp_path / "c.json", fetch=fetch)
    assert find_uv_wheel("1.0.0", cache_path=tmp_path / "d.json", fetch=fetch).version == "1.0.0"


def test_host_uv_version_is_the_running_uv() -> None:
    version = host_uv_version()
    assert version[0].isdigit() and version.count(".") >= 2


@pytest.mark.network
@pytest.mark.slow
def test_real_pypi_urls_serve_files_with_the_recorded_sha256(tmp_path: Path) -> None:
    wheel = find_uv_wheel(cache_path=tmp_path / "uv-wheels.json")
    assert wheel.version == host_uv_version()
    for arch in ("x86_64", "aarch64"):
        artifact = wheel.for_arch(arch)
        assert f"manylinux_2_17_{arch}" in artifact.filename
        with urllib.request.urlopen(artifact.url, timeout=300) as response:
            body = response.read()
        assert hashlib.sha256(body).hexdigest() == artifact.sha256
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            assert any(name.endswith(".data/scripts/uv") for name in archive.namelist())
