"""--pypi-only on real macOS conda files from tests/data/real-envs (real uv, real PyPI), and the one line an
unreachable conda channel gives without it."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from rawvm.cli import main
from rawvm_resolver import Target, lock

# One of each kind: a `conda env export` with builds, a `conda list --explicit`, a hand-written file with a pip
# section that names macOS-only packages.
CORPUS = (
    "conda-twitter-scraper-osx-arm64.yml",
    "conda-chatbot-osx-64-explicit.txt",
    "conda-dojo-env-m1.yml",
)
MACOS_ONLY = ("appnope", "pyobjc", "tensorflow-macos", "tensorflow-metal", "libcxx", "llvm-openmp")


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.parametrize("name", CORPUS)
def test_corpus_file_locks_from_pypi_alone(repo_root: Path, tmp_path: Path, name: str) -> None:
    source = repo_root / "tests" / "data" / "real-envs" / name
    result = lock(source, Target(arch="x86_64", python=""), tmp_path / "bundle", pypi_only=True)
    bundle = tomllib.loads((tmp_path / "bundle" / "rawvm-env.toml").read_text())
    assert not any(entry["kind"] == "conda-lock" for entry in bundle["files"])  # no conda channel needed
    packages = tomllib.loads((tmp_path / "bundle" / "pylock.toml").read_text())["packages"]
    names = {package["name"] for package in packages}
    assert not [n for n in names if n.startswith(MACOS_ONLY)], names
    wheels = [wheel["url"].rsplit("/", 1)[-1] for package in packages for wheel in package.get("wheels", [])]
    assert wheels and not [wheel for wheel in wheels if "macosx" in wheel]
    rows = {row.name: row for row in result.rows}
    assert rows["python"].action == "dropped" and "interpreter" in rows["python"].reason
    dropped = [row for row in result.rows if row.action == "dropped"]
    assert dropped and all(row.reason for row in dropped)
    assert any(row.reason.startswith(("conda-only", "macOS-only")) for row in dropped)
    translated = [row for row in result.rows if row.reason.startswith("conda package")]
    assert translated  # conda packages became PyPI pins, each saying so


def test_unreachable_channel_without_pypi_only_is_one_line_suggesting_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    environment = tmp_path / "environment.yml"
    environment.write_text("name: x\ndependencies:\n  - python=3.11\n  - numpy=1.26.4=py311he598dae_0\n")
    # A closed loopback port: unreachable everywhere, as conda's channels are from a mirror-only network.
    argv = ["lock", "--from", str(environment), "--conda-channel", "http://127.0.0.1:9/conda-forge"]
    assert main([*argv, "-o", str(tmp_path / "bundle")]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "cannot read the conda channels" in lines[0] and "--pypi-only" in lines[0]
