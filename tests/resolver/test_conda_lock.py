"""lock_conda against a real local channel (built in the test): real rattler solves, real lock read-backs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import rattler
import yaml
from rawvm_resolver.conda import CondaInput, lock_conda, read_environment_yml, scan_conda_prefix
from rawvm_resolver.errors import InputError, ResolverError
from rawvm_resolver.target import Target
from uv import find_uv_bin

from tests.resolver.test_conda_channel import build_demo_channel

CPU = Target(arch="x86_64", python="3.11")
CUDA = Target(arch="x86_64", python="3.11", accelerator="cuda", cuda="12.8")


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_channel(tmp_path_factory.mktemp("conda") / "channel")


def _lock(channel: Path, target: Target, *specs: str) -> Any:
    return yaml.safe_load(lock_conda(CondaInput((), specs or ("demo",), ()), target, channels=[str(channel)]))


def _builds(document: Any) -> dict[str, str]:
    return {package["name"]: package["build"] for package in document["package"]}


def test_cpu_target_picks_the_cpu_build(channel: Path) -> None:
    assert _builds(_lock(channel, CPU)) == {"demo": "cpu_0", "libdemo": "0"}


def test_cuda_target_picks_the_cuda_build(channel: Path) -> None:
    document = _lock(channel, CUDA)
    assert _builds(document) == {"demo": "cuda_0", "libdemo": "0"}
    demo = next(p for p in document["package"] if p["name"] == "demo")
    assert demo["dependencies"] == {"__cuda": ">=12", "libdemo": ">=1"}
    assert demo["url"] == f"{channel.as_uri()}/linux-64/demo-1.0-cuda_0.tar.bz2"


def test_cuda_older_than_the_build_needs_falls_back_to_cpu(channel: Path) -> None:
    old = Target(arch="x86_64", python="3.11", accelerator="cuda", cuda="11.8")
    assert _builds(_lock(channel, old))["demo"] == "cpu_0"


def test_aarch64_target_solves_the_aarch64_subdir(channel: Path) -> None:
    document = _lock(channel, Target(arch="aarch64", python="3.11"))
    assert document["metadata"]["platforms"] == ["linux-aarch64"]
    urls = sorted(p["url"] for p in document["package"])
    assert urls == [
        f"{channel.as_uri()}/linux-aarch64/demo-1.0-cpu_0.tar.bz2",
        f"{channel.as_uri()}/noarch/libdemo-1.2-0.tar.bz2",
    ]
    assert {p["platform"] for p in document["package"]} == {"linux-aarch64"}


def test_glibc_of_the_target_is_a_virtual_package(channel: Path) -> None:
    with pytest.raises(ResolverError, match=r"cannot be solved for linux-64 .*__glibc"):
        _lock(channel, CPU, "newglibc")  # needs glibc 2.34, the default image has 2.28
    new_image = Target(arch="x86_64", python="3.11", glibc="2.35")
    assert _builds(_lock(channel, new_image, "newglibc")) == {"newglibc": "0"}


def _versions(document: Any) -> dict[str, str]:
    return {package["name"]: package["version"] for package in document["package"]}


def test_python_pin_of_the_source_is_kept_when_the_target_has_its_version(channel: Path) -> None:
    assert _versions(_lock(channel, CPU, "python ==3.11.8", "demo")) == {"python": "3.11.8", "demo": "1.0",
                                                                          "libdemo": "1.2"}  # fmt: skip


def test_target_python_replaces_a_python_pin_for_another_version(channel: Path) -> None:
    document = _lock(channel, Target(arch="x86_64", python="3.12"), "python ==3.11.8", "demo")
    assert _versions(document)["python"] == "3.12.2"
    assert document["metadata"]["custom_metadata"]["rawvm.specs"] == "python 3.12.*, demo"


def test_python_constraint_adds_no_python(channel: Path) -> None:
    assert "python" not in _versions(_lock(channel, CPU, "demo"))


def test_lock_is_conda_lock_v1(channel: Path) -> None:
    document = _lock(channel, CUDA)
    assert document["version"] == 1
    metadata = document["metadata"]
    assert metadata["platforms"] == ["linux-64"]
    assert metadata["channels"] == [{"url": channel.as_uri(), "used_env_vars": []}]
    assert set(metadata["content_hash"]) == {"linux-64"}
    assert "__cuda=12.8=0" in metadata["custom_metadata"]["rawvm.virtual_packages"]
    for package in document["package"]:
        assert package["manager"] == "conda"
        assert package["category"] == "main"
        assert package["optional"] is False
        assert len(package["hash"]["md5"]) == 32
        assert len(package["hash"]["sha256"]) == 64


def test_lock_reads_back_with_rattler(channel: Path, tmp_path: Path) -> None:
    path = tmp_path / "conda-lock.yml"
    path.write_bytes(lock_conda(CondaInput((), ("demo",), ()), CUDA, channels=[str(channel)]))
    environment = rattler.LockFile.from_path(path).default_environment()
    assert environment is not None
    (platform,) = environment.platforms()
    assert platform.name == "linux-64"
    records = environment.conda_repodata_records_for_platform(platform) or []
    by_name = {str(r.name.normalized): r for r in records}
    assert sorted(by_name) == ["demo", "libdemo"]
    assert str(by_name["demo"].build) == "cuda_0"
    assert str(by_name["demo"].version) == "1.0"
    assert by_name["libdemo"].url == f"{channel.as_uri()}/noarch/libdemo-1.2-0.tar.bz2"
    index = yaml.safe_load((channel / "linux-64" / "repodata.json").read_text())["packages"]
    assert by_name["demo"].sha256 is not None
    assert by_name["demo"].sha256.hex() == index["demo-1.0-cuda_0.tar.bz2"]["sha256"]
    assert sorted(by_name["demo"].depends) == ["__cuda >=12", "libdemo >=1"]


def test_lock_is_byte_identical_when_repeated(channel: Path) -> None:
    conda = CondaInput((), ("demo", "libdemo"), ())
    first = lock_conda(conda, CUDA, channels=[str(channel)])
    assert lock_conda(conda, CUDA, channels=[str(channel)]) == first
    assert b"created_at" not in first
    assert lock_conda(conda, CPU, channels=[str(channel)]) != first


def test_environment_yml_from_a_mac_locks_for_cuda(channel: Path, tmp_path: Path) -> None:
    path = tmp_path / "environment.yml"
    path.write_text(
        f"channels:\n  - {channel}\ndependencies:\n  - demo=1.0=cpu_h1a2b3c4_0\n  - libcxx=16.0.6=h4653b0c_0\n"
        "  - pip:\n      - rich==13.7.1\n"
    )
    conda = read_environment_yml(path)
    assert conda.specs == ("demo ==1.0",)
    assert _builds(yaml.safe_load(lock_conda(conda, CUDA))) == {"demo": "cuda_0", "libdemo": "0"}


def test_a_prefix_rattler_installed_scans_back_to_the_same_lock(channel: Path, tmp_path: Path) -> None:
    """lock → real install (rattler) → scan_conda_prefix → lock: the same packages come out."""
    first = lock_conda(CondaInput((), ("demo",), ()), CUDA, channels=[str(channel)])
    (tmp_path / "conda-lock.yml").write_bytes(first)
    environment = rattler.LockFile.from_path(tmp_path / "conda-lock.yml").default_environment()
    assert environment is not None
    records = environment.conda_repodata_records_for_platform(environment.platforms()[0]) or []
    prefix = tmp_path / "prefix"
    asyncio.run(
        rattler.install(
            records, prefix, cache_dir=tmp_path / "cache", platform=rattler.Subdir("linux-64"), show_progress=False
        )
    )
    scanned = scan_conda_prefix(prefix)
    assert scanned.channels == (channel.as_uri(),)
    assert scanned.specs == ("demo ==1.0", "libdemo ==1.2")  # no requests recorded: every package pinned
    again = yaml.safe_load(lock_conda(scanned, CUDA))
    assert _builds(again) == _builds(yaml.safe_load(first))


def test_explicit_channels_override_the_inputs(channel: Path) -> None:
    conda = CondaInput(("https://conda.invalid/none",), ("demo",), ())
    assert _builds(yaml.safe_load(lock_conda(conda, CPU, channels=[str(channel)])))["demo"] == "cpu_0"


def test_unknown_package_is_one_clear_line(channel: Path) -> None:
    with pytest.raises(ResolverError, match=r"cannot be solved for linux-64 from file://.*nothere") as info:
        _lock(channel, CPU, "nothere")
    assert "\n" not in str(info.value)
    assert info.value.exit_code == 1


@pytest.mark.parametrize("missing", ["/nonexistent/channel", "http://127.0.0.1:1/"])
def test_unreachable_channel_is_one_clear_line(missing: str) -> None:
    with pytest.raises(ResolverError, match=r"cannot read the conda channels .* for linux-64: .*check") as info:
        lock_conda(CondaInput((), ("demo",), ()), CPU, channels=[missing])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("channel", "shown"),
    [
        ("https://ana:s3cret@conda.example.org/private", "https://***@conda.example.org/private"),
        ("https://conda.anaconda.org/t/tk-1234abcd/private", "https://conda.anaconda.org/t/***/private"),
    ],
)
def test_channel_with_credentials_is_refused_without_echoing_them(channel: str, shown: str) -> None:
    with pytest.raises(InputError, match="carries credentials") as info:
        lock_conda(CondaInput((channel,), ("demo",), ()), CPU)
    assert shown in str(info.value)
    assert "s3cret" not in str(info.value)
    assert "tk-1234abcd" not in str(info.value)


def test_empty_conda_part_is_an_input_error() -> None:
    with pytest.raises(InputError, match="names no packages"):
        lock_conda(CondaInput(("conda-forge",), (), ()), CPU)


@pytest.mark.slow
def test_short_lived_process_exits_cleanly(channel: Path) -> None:
    """`rawvm lock` is a short process: py-rattler's threads must not abort it at exit.

    A statistical guard: without the pause at exit, 1 run in 5 to 20 aborted here (SIGABRT/SIGSEGV).
    """
    script = (
        "import sys\n"
        "from rawvm_resolver.conda import CondaInput, lock_conda\n"
        "from rawvm_resolver.target import Target\n"
        "target = Target(arch='x86_64', python='3.11')\n"
        "lock = lock_conda(CondaInput((), ('demo',), ()), target, channels=[sys.argv[1]])\n"
        "print(len(lock))\n"
    )
    for _ in range(20):
        result = subprocess.run(
            [sys.executable, "-c", script, str(channel)], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert int(result.stdout) > 0


def _conda_lock(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run conda-lock 4 from PyPI in an isolated, cached uv environment."""
    command = [find_uv_bin(), "run", "--isolated", "--no-project", "--with", "conda-lock==4.0.3", *args]
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=600, cwd=cwd)


@pytest.mark.network
@pytest.mark.slow
def test_lock_reads_back_with_conda_lock(channel: Path, tmp_path: Path) -> None:
    """conda-lock itself parses the file, sees the same packages, and renders it for `conda create --file`."""
    path = tmp_path / "conda-lock.yml"
    path.write_bytes(lock_conda(CondaInput((), ("demo",), ()), CUDA, channels=[str(channel)]))
    script = (
        "import sys, pathlib\n"
        "from conda_lock.lockfile import parse_conda_lock_file\n"
        "lock = parse_conda_lock_file(pathlib.Path(sys.argv[1]))\n"
        "for p in lock.package: print(p.name, p.version, p.build, p.manager, p.platform, p.hash.sha256)\n"
    )
    parsed = _conda_lock("python", "-c", script, str(path), cwd=tmp_path)
    assert parsed.returncode == 0, parsed.stderr[-2000:]
    document = yaml.safe_load(path.read_text())
    expected = sorted(
        f"{p['name']} {p['version']} {p['build']} conda linux-64 {p['hash']['sha256']}" for p in document["package"]
    )
    assert sorted(parsed.stdout.splitlines()) == expected
    assert any(line.startswith("demo 1.0 cuda_0 ") for line in expected)

    rendered = _conda_lock("conda-lock", "render", "-k", "explicit", "-p", "linux-64", str(path), cwd=tmp_path)
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    explicit = (tmp_path / "conda-linux-64.lock").read_text().splitlines()
    assert "@EXPLICIT" in explicit
    # Dependencies first, each URL with its md5: what `conda create --file` installs.
    assert explicit[explicit.index("@EXPLICIT") + 1 :] == [
        f"{p['url']}#{p['hash']['md5']}" for p in sorted(document["package"], key=lambda p: p["name"] == "demo")
    ]
