"""rawvm export: requirements with hashes, pylock, conda-lock passthrough, Dockerfile; from a real small bundle."""

from __future__ import annotations

import contextlib
import io
import tomllib
from pathlib import Path

import pytest
from rawvm.cli import main

from tests.helpers.network import with_retries

pytestmark = [pytest.mark.network]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export")
    (root / "requirements.txt").write_text("six==1.17.0\nattrs==24.2.0\n")
    out = root / "bundle"
    argv = ["lock", "--from", str(root / "requirements.txt"), "--python", "3.12", "-o", str(out)]

    def locked() -> None:
        said = io.StringIO()
        with contextlib.redirect_stderr(said):
            if main(argv) != 0:
                raise RuntimeError(said.getvalue())  # with_retries reads it: a DNS hiccup is tried again

    with_retries(locked)
    return out


def export(bundle: Path, fmt: str, out: Path) -> int:
    return main(["export", str(bundle), "--format", fmt, "-o", str(out)])


def test_requirements_have_a_hash_for_every_package(bundle: Path, tmp_path: Path) -> None:
    assert export(bundle, "requirements", tmp_path / "requirements.txt") == 0
    text = (tmp_path / "requirements.txt").read_text()
    assert "six==1.17.0 \\\n    --hash=sha256:" in text
    assert "attrs==24.2.0 \\\n    --hash=sha256:" in text
    pins = [line for line in text.splitlines() if "==" in line]
    assert len(pins) == len(tomllib.loads((bundle / "pylock.toml").read_text())["packages"])


def test_pylock_export_is_the_bundles_lock(bundle: Path, tmp_path: Path) -> None:
    assert export(bundle, "pylock", tmp_path / "pylock.toml") == 0
    assert (tmp_path / "pylock.toml").read_bytes() == (bundle / "pylock.toml").read_bytes()


def test_dockerfile_installs_the_lock_with_uv_on_the_targets_python(bundle: Path, tmp_path: Path) -> None:
    assert export(bundle, "dockerfile", tmp_path / "Dockerfile") == 0
    text = (tmp_path / "Dockerfile").read_text()
    assert "FROM --platform=linux/amd64 python:3.12-slim" in text
    assert "COPY --from=ghcr.io/astral-sh/uv:" in text
    assert "RUN uv pip install --system --no-deps -r /opt/rawvm/pylock.toml" in text


def test_conda_lock_export_without_conda_part_is_one_line(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert export(bundle, "conda-lock", tmp_path / "conda-lock.yml") == 2
    assert "has no conda part" in capsys.readouterr().err


def test_a_tampered_bundle_is_refused(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in bundle.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    (copy / "pylock.toml").write_text((copy / "pylock.toml").read_text() + "\n# edited\n")
    assert export(copy, "pylock", tmp_path / "out.toml") == 1
    assert "does not match the bundle's manifest" in capsys.readouterr().err


def test_not_a_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert export(tmp_path, "pylock", tmp_path / "out.toml") == 2
    assert "is not a rawvm bundle" in capsys.readouterr().err
