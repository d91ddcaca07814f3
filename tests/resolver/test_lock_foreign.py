"""Lock FOREIGN macOS arm64 environments for Linux targets, for real: uv resolves against PyPI.

The environments are dist-info trees whose METADATA and WHEEL come from the real macOS wheels (foreign_env.py);
the lock only needs metadata, so no torch wheel is ever downloaded. The installs use small packages only.
"""

from __future__ import annotations

import os
import subprocess
import tarfile
import tomllib
from pathlib import Path
from typing import Any

import pytest
from rawvm.cli import main
from rawvm_resolver import LockResult, Target, lock
from rawvm_resolver.bundle import sha256_file

from tests.helpers.network import with_retries
from tests.resolver.foreign_env import add_editable, build_venv

pytestmark = [pytest.mark.network, pytest.mark.slow]

BIG = [
    "torch==2.5.1",
    "numpy",
    "pandas",
    "scikit-learn",
    "matplotlib",
    "ipykernel",
    "pyobjc-core",
    "tensorflow-macos==2.16.2",
    "tensorflow-metal==1.1.0",
    "mlx==0.29.4",
]
SMALL = ["six==1.17.0", "markupsafe", "pyyaml", "appnope", "docopt==0.6.2"]  # docopt: sdist only
CUDA_X86 = Target(arch="x86_64", python="", accelerator="cuda", cuda="12.8")


def env_with_project(
    root: Path, packages: list[str], local: tuple[str, str, list[str]], script: tuple[str, str]
) -> tuple[Path, Path]:
    """(venv, project dir): a venv of ``packages`` plus an editable local package (name, version, requires),
    and a project dir holding one module (file name, text)."""
    site = build_venv(root / "venv", packages)
    add_editable(site, root / "localpkg", *local)
    project = root / "project"
    project.mkdir()
    (project / script[0]).write_text(script[1])
    return root / "venv", project


@pytest.fixture(scope="session")
def big_env(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(venv, project dir): the data-science stack plus an editable local package and a local module."""
    script = ("analysis.py", "import mylocal\nprint(mylocal.VALUE)\n")
    return env_with_project(tmp_path_factory.mktemp("big"), BIG, ("mylocal", "0.3.0", ["numpy"]), script)


@pytest.fixture(scope="session")
def small_env(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    script = ("job.py", "import yaml, smalllocal\nprint(yaml.safe_dump({'v': smalllocal.VALUE}))\n")
    return env_with_project(tmp_path_factory.mktemp("small"), SMALL, ("smalllocal", "1.0.0", ["six"]), script)


@pytest.fixture(scope="session")
def big_cuda_lock(big_env: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> LockResult:
    venv, project = big_env
    out = tmp_path_factory.mktemp("cuda") / "bundle"
    return with_retries(lambda: lock(venv, CUDA_X86, out, project_dir=project))


def rows_by_name(result: LockResult) -> dict[str, tuple[str, str, str, str]]:
    return {row.name: (row.action, row.source, row.target, row.reason) for row in result.rows}


def locked(bundle: Path) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in tomllib.loads((bundle / "pylock.toml").read_text())["packages"]}


def test_cuda_x86_64_lock_translates_and_brings_nvidia(big_cuda_lock: LockResult) -> None:
    rows = rows_by_name(big_cuda_lock)
    assert rows["tensorflow-macos"][0] == "translated" and rows["tensorflow-macos"][2] == "tensorflow 2.16.2"
    # tensorflow[and-cuda] pins CUDA 12.3 libraries, torch 2.5.1 pins 12.4 ones: the report says so.
    assert "conflict" in rows["tensorflow-macos"][3]
    assert rows["tensorflow-metal"][0] == "dropped" and "Metal" in rows["tensorflow-metal"][3]
    assert rows["pyobjc-core"][0] == "dropped" and "macOS" in rows["pyobjc-core"][3]
    assert rows["appnope"][0] == "dropped"
    assert rows["torch"][:3] == ("translated", "2.5.1", "2.5.1") and "nvidia-*" in rows["torch"][3]
    assert rows["mlx"][0] == "dropped" and "WARNING" in rows["mlx"][3]  # Linux wheels need glibc 2.35
    assert rows["mylocal"][0] == "kept" and "wheel" in rows["mylocal"][3]
    assert rows["numpy"][:3] == ("kept", "1.26.4", "1.26.4")

    packages = locked(big_cuda_lock.bundle_dir)
    assert packages["torch"]["version"] == "2.5.1"
    torch_wheels = [w["url"] for w in packages["torch"]["wheels"]]
    assert torch_wheels and all("manylinux" in url and "x86_64" in url for url in torch_wheels)
    nvidia = sorted(name for name in packages if name.startswith("nvidia-"))
    assert "nvidia-cudnn-cu12" in nvidia and "nvidia-cublas-cu12" in nvidia
    assert all(rows[name][0] == "added" and "torch" in rows[name][3] for name in nvidia)
    for name in ("tensorflow-metal", "pyobjc-core", "appnope", "tensorflow-macos", "mlx", "mlx-metal"):
        assert name not in packages


def test_bundle_matches_contract_1(big_cuda_lock: LockResult) -> None:
    bundle = big_cuda_lock.bundle_dir
    manifest_bytes = (bundle / "rawvm-env.toml").read_bytes()
    assert sha256_file(bundle / "rawvm-env.toml") == big_cuda_lock.manifest_sha256
    manifest = tomllib.loads(manifest_bytes.decode())
    assert manifest["format"] == 1
    assert manifest["target"] == {
        "os": "linux",
        "arch": "x86_64",
        "glibc": "2.28",
        "python": "3.11",
        "accelerator": "cuda",
        "cuda": "12.8",
    }
    assert manifest["source"]["platform"].startswith("macosx_") and manifest["source"]["python"] == "3.11.9"
    assert manifest["source"]["fingerprint"].startswith("sha256:")
    paths = [entry["path"] for entry in manifest["files"]]
    assert paths == sorted(paths)
    assert {"pylock.toml", "code.tar.gz"} <= set(paths)
    assert any(path.startswith("wheels/mylocal-0.3.0-") for path in paths)
    for entry in manifest["files"]:
        assert sha256_file(bundle / entry["path"]) == entry["sha256"]
    names = [row["name"] for row in manifest["report"]]
    assert names == sorted(names)
    with tarfile.open(bundle / "code.tar.gz") as archive:
        members = archive.getmembers()
    assert [m.name for m in members] == ["analysis.py"]
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in members)
    # Every remote artifact carries a sha256, and only target wheels are listed.
    for entry in locked(bundle).values():
        artifacts = [*entry.get("wheels", []), *([entry["sdist"]] if "sdist" in entry else [])]
        assert artifacts and all(len(a["hashes"]["sha256"]) == 64 for a in artifacts)
        assert all("macosx" not in str(a.get("url", "")) for a in artifacts)


def test_aarch64_cpu_lock(big_env: tuple[Path, Path], tmp_path: Path) -> None:
    venv, project = big_env
    result = lock(venv, Target(arch="aarch64", python=""), tmp_path / "bundle", project_dir=project)
    rows = rows_by_name(result)
    assert rows["tensorflow-macos"][:3] == ("translated", "2.16.2", "tensorflow 2.16.2")
    assert "conflict" not in rows["tensorflow-macos"][3]
    assert rows["torch"][0] == "translated" and "aarch64" in rows["torch"][3]
    packages = locked(result.bundle_dir)
    assert all("aarch64" in w["url"] for w in packages["torch"]["wheels"])
    assert not [name for name in packages if name.startswith("nvidia-")]
    assert rows["mlx"][0] == "dropped"


def test_aarch64_cuda_without_torch_index_is_one_clear_line(
    big_env: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    venv, _ = big_env
    code = main(["lock", "--from", str(venv), "--platform", "linux-aarch64", "--cuda", "-o", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert "--torch-index https://download.pytorch.org/whl/cu128" in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_mlx_moves_to_the_nearest_release_with_a_linux_wheel_and_strict_refuses(
    big_env: tuple[Path, Path], tmp_path: Path
) -> None:
    venv, project = big_env
    target = Target(arch="aarch64", python="", glibc="2.35")  # mlx 0.29.4 has x86_64 Linux wheels only
    result = lock(venv, target, tmp_path / "b", project_dir=project)
    action, source, new, reason = rows_by_name(result)["mlx"]
    assert (action, source) == ("version-changed", "0.29.4") and new.startswith("0.30")
    assert "nearest" in reason
    from rawvm_resolver.errors import ResolverError

    with pytest.raises(ResolverError, match=r"--strict: mlx==0\.29\.4"):
        lock(venv, target, tmp_path / "strict", project_dir=project, strict=True)


def test_locking_twice_gives_byte_identical_bundles(small_env: tuple[Path, Path], tmp_path: Path) -> None:
    venv, project = small_env
    target = Target(arch="x86_64", python="")
    first = lock(venv, target, tmp_path / "one", project_dir=project)
    second = lock(venv, target, tmp_path / "two", project_dir=project)
    assert first.manifest_sha256 == second.manifest_sha256
    files_one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    files_two = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file())
    assert files_one == files_two
    for relative in files_one:
        assert (tmp_path / "one" / relative).read_bytes() == (tmp_path / "two" / relative).read_bytes()


def _clean_pip_env() -> dict[str, str]:
    """This machine's pip config adds constraints and find-links: neutralise it to test real PyPI behaviour."""
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_CONSTRAINT", "PIP_FIND_LINKS", "VIRTUAL_ENV")}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


@pytest.fixture(scope="session")
def small_cpu_bundle(small_env: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv, project = small_env
    out = tmp_path_factory.mktemp("small-cpu") / "bundle"
    result = with_retries(lambda: lock(venv, Target(arch="x86_64", python=""), out, project_dir=project))
    rows = rows_by_name(result)
    assert rows["appnope"][0] == "dropped" and rows["smalllocal"][0] == "kept"
    assert rows["docopt"][0] == "builds-from-source" and "builds from its sdist on the VM" in rows["docopt"][3]
    return out


def _fresh_venv(path: Path) -> Path:
    from uv import find_uv_bin

    subprocess.run([find_uv_bin(), "venv", "--quiet", "--python", "3.11", str(path)], check=True, env=_clean_pip_env())
    return path / "bin" / "python"


IMPORTS = "import six, markupsafe, yaml, docopt, smalllocal; assert smalllocal.VALUE == 42; print(yaml.__version__)"


def test_installs_with_uv_pip_sync(small_cpu_bundle: Path, tmp_path: Path) -> None:
    from uv import find_uv_bin

    python = _fresh_venv(tmp_path / "venv")
    subprocess.run(
        [find_uv_bin(), "pip", "sync", "--python", str(python), str(small_cpu_bundle / "pylock.toml")],
        check=True,
        env=_clean_pip_env(),
        cwd=tmp_path,
    )
    completed = subprocess.run([str(python), "-c", IMPORTS], capture_output=True, text=True, check=True)
    assert completed.stdout.strip() == "6.0.4" or completed.stdout.strip()


def test_installs_with_pip_26(small_cpu_bundle: Path, tmp_path: Path) -> None:
    from uv import find_uv_bin

    env = _clean_pip_env()
    python = _fresh_venv(tmp_path / "venv")
    subprocess.run(
        [find_uv_bin(), "pip", "install", "--quiet", "--python", str(python), "pip>=26"], check=True, env=env
    )
    version = subprocess.run([str(python), "-m", "pip", "--version"], capture_output=True, text=True, check=True)
    assert int(version.stdout.split()[1].split(".")[0]) >= 26
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "-r", str(small_cpu_bundle / "pylock.toml")],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    subprocess.run([str(python), "-c", IMPORTS], check=True)
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format", "freeze"], capture_output=True, text=True)
    assert "six==1.17.0" in listed.stdout and "appnope" not in listed.stdout.lower()


def test_a_package_that_exists_for_no_linux_platform(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # mediapipe-silicon: a community build with macOS arm64 wheels only, and in no rule (mlx-metal now is one)
    build_venv(tmp_path / "venv", ["mediapipe-silicon==0.9.2.1", "six==1.17.0"])
    code = main(["lock", "--from", str(tmp_path / "venv"), "-o", str(tmp_path / "bundle")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("rawvm: mediapipe-silicon exists for no Linux platform")
    assert "macosx" in err[-1] and "remove it" in err[-1]
    assert not (tmp_path / "bundle").exists()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["--platform", "linux-riscv64"],
            "unknown platform 'linux-riscv64': choose one of linux-x86_64, linux-aarch64",
        ),
        (["--platform", "windows-x86_64"], "unknown platform"),
        (["--from", "/nonexistent/env"], "/nonexistent/env: no such file or directory"),
        (["--python", "three"], "invalid Python version 'three'"),
        (["--cuda", "twelve"], "invalid CUDA version 'twelve'"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(
    argv: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["lock", *argv, "-o", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert expected in err


def test_a_directory_that_is_no_environment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    code = main(["lock", "--from", str(tmp_path / "photos"), "-o", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert "is no Python environment or project" in err[-1] and "venv" in err[-1]


def test_exported_requirements_install_in_require_hashes_mode(small_cpu_bundle: Path, tmp_path: Path) -> None:
    from uv import find_uv_bin

    requirements = tmp_path / "requirements.txt"
    assert main(["export", str(small_cpu_bundle), "--format", "requirements", "-o", str(requirements)]) == 0
    python = _fresh_venv(tmp_path / "venv")
    command = [find_uv_bin(), "pip", "install", "--python", str(python), "--require-hashes", "--no-deps"]
    subprocess.run(
        [*command, "-r", str(requirements)],
        check=True,
        env=_clean_pip_env(),
        cwd=small_cpu_bundle,  # local wheels are listed as ./wheels/...
    )
    subprocess.run([str(python), "-c", IMPORTS], check=True)
