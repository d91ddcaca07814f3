"""Scanning environments other than the running one, and file inputs. Offline: dist-info trees written here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from rawvm_resolver.errors import InputError
from rawvm_resolver.scan import scan


def dist_info(
    site: Path,
    name: str,
    version: str,
    *,
    tags: str = "py3-none-any",
    requires: list[str] | None = None,
    requested: bool = False,
    direct_url: dict[str, object] | None = None,
) -> None:
    path = site / f"{name.replace('-', '_')}-{version}.dist-info"
    path.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    lines += [f"Requires-Dist: {req}" for req in requires or []]
    (path / "METADATA").write_text("\n".join(lines) + "\n")
    (path / "WHEEL").write_text("Wheel-Version: 1.0\n" + "".join(f"Tag: {t}\n" for t in tags.split()))
    (path / "INSTALLER").write_text("pip\n")
    if requested:
        (path / "REQUESTED").write_text("")
    if direct_url is not None:
        (path / "direct_url.json").write_text(json.dumps(direct_url))


@pytest.fixture
def mac_site(tmp_path: Path) -> Path:
    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    dist_info(site, "numpy", "2.1.3", tags="cp311-cp311-macosx_14_0_arm64")
    dist_info(site, "pandas", "2.2.3", tags="cp311-cp311-macosx_11_0_arm64", requires=["numpy>=1.23"], requested=True)
    dist_info(site, "ipykernel", "6.29.5", requires=['appnope; platform_system == "Darwin"'], requested=True)
    dist_info(site, "appnope", "0.1.4")
    dist_info(site, "dask", "2024.12.0", requires=['pyarrow>=14; extra == "dataframe"'], requested=True)
    dist_info(site, "pyarrow", "18.1.0", tags="cp311-cp311-macosx_12_0_arm64")
    dist_info(site, "scipy", "1.14.1", tags="cp311-cp311-macosx_14_0_arm64", requires=["numpy"])
    dist_info(
        site,
        "mypkg",
        "0.1.0",
        requested=True,
        direct_url={"url": "file:///home/me/mypkg", "dir_info": {"editable": True}},
    )
    dist_info(
        site,
        "gitpkg",
        "1.0",
        requested=True,
        direct_url={"url": "https://github.com/o/r", "vcs_info": {"vcs": "git", "commit_id": "abc123"}},
    )
    return site


def test_bare_site_packages_reads_platform_and_python_from_the_files(mac_site: Path) -> None:
    env = scan(mac_site)
    assert env.platform.python == "3.11"
    assert env.platform.platform == "macosx_14_0_arm64"
    assert (env.platform.os, env.platform.arch) == ("macos", "arm64")
    dists = env.by_name()
    assert dists["numpy"].version == "2.1.3"
    assert dists["numpy"].wheel_tags == ("cp311-cp311-macosx_14_0_arm64",)
    assert dists["pandas"].requires == ("numpy>=1.23",)
    assert dists["mypkg"].source.kind == "editable"
    assert dists["mypkg"].source.local_path == Path("/home/me/mypkg")
    assert (dists["gitpkg"].source.kind, dists["gitpkg"].source.commit) == ("vcs", "abc123")


def test_requested_means_REQUESTED_or_needed_only_through_an_extra(mac_site: Path) -> None:
    dists = scan(mac_site).by_name()
    assert dists["pandas"].requested and dists["ipykernel"].requested
    assert dists["pyarrow"].requested  # only dask[dataframe] needs it: asking for dask alone would lose it
    assert not dists["numpy"].requested  # needed unconditionally by pandas
    assert not dists["appnope"].requested  # needed behind a platform marker: uv decides for the target


def test_venv_reads_the_full_python_version(mac_site: Path) -> None:
    venv = mac_site.parents[2]
    (venv / "pyvenv.cfg").write_text("home = /opt/homebrew/bin\nversion_info = 3.11.9\n")
    env = scan(venv)
    assert env.platform.python == "3.11.9"
    assert env.kind == "environment"


def test_an_interpreter_path_is_asked_where_its_packages_are(tmp_path: Path) -> None:
    versioned = tmp_path / f"python{sys.version_info.major}.{sys.version_info.minor}"
    versioned.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # "python3.11" has a suffix, yet runs
    versioned.chmod(0o755)
    assert scan(versioned).by_name().keys() == scan(sys.executable).by_name().keys()
    env = scan(sys.executable)
    assert env.platform.python.startswith(f"{sys.version_info.major}.{sys.version_info.minor}")
    assert "packaging" in env.by_name()


def test_the_running_environment() -> None:
    env = scan(None)
    assert env.origin == "running environment"
    assert "rawvm-resolver" in env.by_name()


def test_fingerprint_changes_with_versions(mac_site: Path, tmp_path: Path) -> None:
    first = scan(mac_site).fingerprint()
    assert first == scan(mac_site).fingerprint()
    dist_info(mac_site, "six", "1.17.0")
    assert scan(mac_site).fingerprint() != first


def test_requirements_file(tmp_path: Path) -> None:
    (tmp_path / "base.txt").write_text("six==1.17.0\n")
    local = tmp_path / "pkg"
    local.mkdir()
    (local / "pyproject.toml").write_text('[project]\nname = "My_Pkg"\nversion = "1"\n')
    (tmp_path / "requirements.txt").write_text(
        "-r base.txt\n# a comment\nrequests>=2.31  # trailing\ndask[dataframe]==2024.12.0 \\\n"
        "    --hash=sha256:00\n--index-url https://example.invalid/simple\n-e ./pkg\n"
    )
    env = scan(tmp_path / "requirements.txt")
    dists = env.by_name()
    assert env.kind == "requirements"
    assert dists["six"].version == "1.17.0" and dists["six"].requested
    assert dists["dask"].extras == ("dataframe",)
    assert dists["my-pkg"].source.kind == "editable"
    assert env.requirements == ("requests>=2.31",)


def test_pyproject_and_uv_lock(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "app"\nversion = "0.1"\ndependencies = ["httpx>=0.27", "rich"]\n'
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
    )
    (tmp_path / ".python-version").write_text("3.12\n")
    (tmp_path / "app").mkdir()  # the project's code: without it the project is left out (nothing to build)
    env = scan(tmp_path / "pyproject.toml")
    assert env.requirements == ("httpx>=0.27", "rich")
    assert env.platform.python == "3.12"
    assert env.by_name()["app"].source.kind == "editable"

    (tmp_path / "uv.lock").write_text(
        'version = 1\n\n[[package]]\nname = "app"\nversion = "0.1"\nsource = { editable = "." }\n'
        'dependencies = [{ name = "rich" }]\n\n'
        '[package.dev-dependencies]\ndev = [{ name = "moto", extra = ["server"] }]\n\n'
        '[[package]]\nname = "moto"\nversion = "5.0.0"\nsource = { registry = "https://pypi.org/simple" }\n\n'
        '[[package]]\nname = "rich"\nversion = "13.9.4"\nsource = { registry = "https://pypi.org/simple" }\n'
        'dependencies = [{ name = "pygments" }]\n\n'
        '[[package]]\nname = "pygments"\nversion = "2.18.0"\nsource = { registry = "https://pypi.org/simple" }\n'
    )
    dists = scan(tmp_path).by_name()  # a directory with uv.lock reads the lock
    assert dists["rich"].version == "13.9.4" and dists["rich"].requested
    assert dists["pygments"].version == "2.18.0" and not dists["pygments"].requested
    assert dists["app"].source.kind == "editable"
    assert dists["moto"].requested and dists["moto"].extras == ("server",)  # uv sync installs the dev group


@pytest.mark.parametrize("make", ["missing", "empty-dir", "text-file"])
def test_a_path_that_is_no_environment_is_one_clear_error(tmp_path: Path, make: str) -> None:
    path = tmp_path / "thing"
    if make == "empty-dir":
        path.mkdir()
    elif make == "text-file":
        path = tmp_path / "notes.md"
        path.write_text("hello\n")
    with pytest.raises(InputError) as error:
        scan(path)
    message = str(error.value)
    assert "\n" not in message
    assert str(path) in message and "venv" in message
