"""The README's main command, `rawvm lock --explain -o DIR`, on this repository's own environment."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from rawvm.cli import main

pytestmark = [pytest.mark.network, pytest.mark.slow]


def test_readme_lock_command_on_the_workspace_environment(
    repo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(repo_root)
    out = tmp_path / "bundle"
    assert main(["lock", "--explain", "-o", str(out)]) == 0
    table = capsys.readouterr().out
    assert table.startswith("linux-x86_64 Python 3.11 (cpu)")
    assert "rawvm-resolver" in table and "local package" in table
    manifest = tomllib.loads((out / "rawvm-env.toml").read_text())
    paths = [entry["path"] for entry in manifest["files"]]
    assert any(path.startswith("wheels/rawvm_resolver-") for path in paths)
    assert manifest["source"]["platform"].startswith("linux")
    packages = {p["name"] for p in tomllib.loads((out / "pylock.toml").read_text())["packages"]}
    assert {"packaging", "uv", "tomli-w"} <= packages
