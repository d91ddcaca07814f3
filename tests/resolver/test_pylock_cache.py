"""A bundle's pylock.toml names each package's index, so ``uv pip sync`` reuses its cache instead of growing it.

uv's own pylock output carries no ``index``; synced as it is, every wheel counts as a bare URL and uv unpacks it into a
new cache entry on every install (a local machine's environment grew the cache by about a GB a run, and the test
suite filled CI's disk). The real-uv test syncs one lock into two fresh venvs and counts the unpacked archives.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from rawvm_resolver.pylock import PYPI_SIMPLE, build_pylock, dumps, index_of
from rawvm_resolver.target import Target

from tests.systools import need_index

SIX_URL = (
    "https://files.pythonhosted.org/packages/b7/ce/149a00dd41f10bc29e5921b496af8b574d8413afcd5e30dfa0ed46c2cc5e/"
    "six-1.17.0-py2.py3-none-any.whl"
)
SIX_SHA256 = "4721f391ed90541fddacab5acf947aa0d3dc7d27b2e1e8eda2be8970586c3274"
TORCH_INDEX = "https://download.pytorch.org/whl/cu124"


def wheel(url: str) -> dict[str, object]:
    return {"url": url, "hashes": {"sha256": SIX_SHA256}}


def test_the_index_is_named_by_the_host_its_files_come_from() -> None:
    assert index_of({"wheels": [wheel(SIX_URL)]}, []) == PYPI_SIMPLE
    torch = {"wheels": [wheel("https://download.pytorch.org/whl/cu124/torch-2.5.1%2Bcu124-cp311-linux_x86_64.whl")]}
    assert index_of(torch, [TORCH_INDEX + "/"]) == TORCH_INDEX
    assert index_of(torch, []) is None  # a host no index of the lock serves: left unnamed
    assert index_of(torch, [TORCH_INDEX, "https://download.pytorch.org/whl/cpu"]) is None  # ambiguous
    assert index_of({"wheels": [{"path": "wheels/mine-1.0-py3-none-any.whl"}]}, []) is None  # local files


def test_uvs_own_index_is_kept() -> None:
    entry = {"name": "six", "version": "1.17.0", "index": "https://mirror.example/simple", "wheels": [wheel(SIX_URL)]}
    document = build_pylock({"packages": [entry]}, Target(arch="x86_64", python="3.11"), [])
    assert document["packages"][0]["index"] == "https://mirror.example/simple"


def archives(cache: Path) -> int:
    folder = cache / "archive-v0"
    return len(list(folder.iterdir())) if folder.is_dir() else 0


def test_syncing_one_lock_twice_unpacks_its_wheels_once(tmp_path: Path) -> None:
    need_index()
    entry = {"name": "six", "version": "1.17.0", "wheels": [wheel(SIX_URL)]}
    lock = tmp_path / "pylock.toml"
    lock.write_text(dumps(build_pylock({"packages": [entry]}, Target(arch="x86_64", python="3.11"), [])))
    cache = tmp_path / "uv-cache"
    env = {**os.environ, "UV_CACHE_DIR": str(cache), "UV_NO_PROGRESS": "1"}
    counts = []
    for name in ("first", "second"):
        venv = tmp_path / name
        subprocess.run(["uv", "venv", "--quiet", "--python", sys.executable, str(venv)], check=True, env=env)
        subprocess.run(
            ["uv", "pip", "sync", "--quiet", "--python", str(venv / "bin" / "python"), str(lock)], check=True, env=env
        )
        counts.append(archives(cache))
    assert counts == [1, 1]
