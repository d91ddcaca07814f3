"""The local VM image recipe and the qemu boot helpers: the pure rules, each beside a test.

The real build (debootstrap, minutes) runs in tests/vm, where ``ensure_image`` is exercised for real.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from rawvm_images import local_vm, qemu_boot
from rawvm_images.local_vm import ImageError, LocalImage


def test_recipe_key_is_stable_and_follows_the_package_list(monkeypatch: pytest.MonkeyPatch) -> None:
    key = local_vm.recipe_key()
    assert key == local_vm.recipe_key()
    assert key.startswith("debian-bookworm-x86_64-")
    monkeypatch.setattr(local_vm, "PACKAGES", (*local_vm.PACKAGES, "htop"))
    assert local_vm.recipe_key() != key


def test_recipe_has_what_vm_facts_requires() -> None:
    assert "python3-cffi-backend" in local_vm.PACKAGES  # else cloud-init stays unconfigured
    assert "dbus" in local_vm.PACKAGES  # else logind cannot schedule the backstop shutdown
    assert "net.ifnames=0" in local_vm.KERNEL_CMDLINE
    assert local_vm.ROOT_FILES["etc/machine-id"] == ""
    assert "NoCloud" in local_vm.ROOT_FILES["etc/cloud/cloud.cfg.d/99_nocloud.cfg"]
    # The host's CA certificates must never be baked in: they travel through the user-data.
    assert not any("ca-certificates/" in path for path in local_vm.ROOT_FILES)


def test_default_cache_dir_follows_rawvm_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RAWVM_CACHE", str(tmp_path))
    assert local_vm.default_cache_dir() == tmp_path / "images"
    monkeypatch.delenv("RAWVM_CACHE")
    assert local_vm.default_cache_dir() == Path.home() / ".cache" / "rawvm" / "images"


def test_mirror_from_deb822_sources_skips_security(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\nComponents: main\n"
    )
    assert local_vm.host_debian_mirror(tmp_path) == "http://mirror.example/debian"


def test_mirror_from_one_line_sources_list(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text(
        "# comment\ndeb [arch=amd64] http://ftp.example/debian bookworm main\n"
        "deb http://ftp.example/debian trixie main\n"
    )
    assert local_vm.host_debian_mirror(tmp_path) == "http://ftp.example/debian"


def test_mirror_defaults_to_deb_debian_org(tmp_path: Path) -> None:
    assert local_vm.host_debian_mirror(tmp_path) == local_vm.DEFAULT_MIRROR


@pytest.mark.parametrize(
    ("version", "expected"),
    [("2.36-9+deb12u10", "2.36"), ("3.11.2-1+b1", "3.11"), ("1:2.40-1", "2.40")],
)
def test_major_minor(version: str, expected: str) -> None:
    assert local_vm.major_minor(version) == expected


def test_major_minor_rejects_garbage() -> None:
    with pytest.raises(ImageError):
        local_vm.major_minor("unknown")


def test_package_version_reads_the_roots_dpkg_status(tmp_path: Path) -> None:
    status = tmp_path / "var/lib/dpkg/status"
    status.parent.mkdir(parents=True)
    status.write_text(
        "Package: libc6-dev\nStatus: install ok installed\nVersion: 9.9-1\n\n"
        "Package: libc6\nStatus: install ok installed\nVersion: 2.36-9+deb12u10\n\n"
        "Package: python3\nStatus: deinstall ok config-files\nVersion: 3.11.2-1\n"
    )
    assert local_vm.package_version(tmp_path, "libc6") == "2.36-9+deb12u10"
    with pytest.raises(ImageError, match="python3 is not installed"):
        local_vm.package_version(tmp_path, "python3")


def test_missing_tools_name_the_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr("shutil.which", lambda name, path=None: None)
    with pytest.raises(ImageError) as info:
        local_vm.require_tools(("debootstrap", "qemu-system-x86_64"))
    message = str(info.value)
    assert "apt-get install debootstrap qemu-system-x86" in message
    assert "\n" not in message


def _fake_image(directory: Path) -> None:
    directory.mkdir(parents=True)
    for name in ("disk.raw", "vmlinuz", "initrd.img"):
        (directory / name).write_bytes(b"x")
    meta = {"glibc": "2.36", "python": "3.11", "arch": "x86_64", "cmdline": local_vm.KERNEL_CMDLINE}
    (directory / "image.json").write_text(json.dumps(meta))


def test_ensure_image_uses_the_cache_without_building(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_image(tmp_path / local_vm.recipe_key())

    def no_build(*_args: object) -> None:
        raise AssertionError("must not build when the cache holds the image")

    monkeypatch.setattr(local_vm, "build_image", no_build)
    image = local_vm.ensure_image(tmp_path)
    assert image.glibc == "2.36"
    assert image.disk == tmp_path / local_vm.recipe_key() / "disk.raw"


def test_concurrent_builders_build_once_and_publish_atomically(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    builds: list[Path] = []
    monkeypatch.setattr(local_vm, "require_tools", lambda *_a: None)
    monkeypatch.setattr("os.geteuid", lambda: 0)

    def fake_build(out: Path, _mirror: str, _progress: object) -> None:
        builds.append(out)
        assert not (tmp_path / local_vm.recipe_key()).exists()  # readers never see a half-built image
        meta = {"glibc": "2.36", "python": "3.11", "arch": "x86_64", "cmdline": local_vm.KERNEL_CMDLINE}
        (out / "image.json").write_text(json.dumps(meta))

    monkeypatch.setattr(local_vm, "build_image", fake_build)
    results: list[LocalImage] = []
    threads = [threading.Thread(target=lambda: results.append(local_vm.ensure_image(tmp_path))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1
    assert len({r.disk for r in results}) == 1
    assert not list(tmp_path.glob(".build-*"))


def test_failed_build_leaves_no_partial_image(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(local_vm, "require_tools", lambda *_a: None)
    monkeypatch.setattr("os.geteuid", lambda: 0)

    def broken(out: Path, _mirror: str, _progress: object) -> None:
        (out / "half").write_text("x")
        raise ImageError("image build: debootstrap failed")

    monkeypatch.setattr(local_vm, "build_image", broken)
    with pytest.raises(ImageError):
        local_vm.ensure_image(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [f"{local_vm.recipe_key()}.lock"]


def test_building_needs_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(local_vm, "require_tools", lambda *_a: None)
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    with pytest.raises(ImageError, match="needs root"):
        local_vm.ensure_image(tmp_path)


# -- qemu_boot ----------------------------------------------------------------------------------------------------


def test_software_kvm_is_not_hardware_kvm(tmp_path: Path) -> None:
    dev = tmp_path / "kvm"
    dev.write_text("")
    modules = tmp_path / "module"
    (modules / "kvm").mkdir(parents=True)
    (modules / "kvm_pvm").mkdir()
    assert not qemu_boot.hardware_kvm(modules, dev)
    (modules / "kvm_intel").mkdir()
    assert qemu_boot.hardware_kvm(modules, dev)
    assert not qemu_boot.hardware_kvm(modules, tmp_path / "absent")


def test_choose_accel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qemu_boot, "hardware_kvm", lambda: False)
    assert qemu_boot.choose_accel() == qemu_boot.TCG
    assert qemu_boot.choose_accel("kvm") == qemu_boot.KVM
    monkeypatch.setattr(qemu_boot, "hardware_kvm", lambda: True)
    assert qemu_boot.choose_accel() == qemu_boot.KVM
    with pytest.raises(ImageError, match="auto, kvm or tcg"):
        qemu_boot.choose_accel("hvf")


def test_meta_data_has_a_fresh_instance_id_each_boot() -> None:
    first, second = qemu_boot.meta_data("m1"), qemu_boot.meta_data("m1")
    assert first != second
    assert "local-hostname: m1" in first


def test_qemu_command_powers_off_with_the_guest_and_forwards_the_agent(tmp_path: Path) -> None:
    image = LocalImage(tmp_path / "d", tmp_path / "k", tmp_path / "i", "2.36", "3.11", "x86_64")
    files = qemu_boot.BootFiles(tmp_path / "m")
    argv = qemu_boot.qemu_command(image, files, forwards=[(40000, 8470)])
    assert "-no-reboot" in argv
    assert "-daemonize" in argv
    assert argv[argv.index("-accel") + 1] == "tcg,thread=multi"
    assert argv[argv.index("-cpu") + 1] == "max"
    assert "user,id=n0,hostfwd=tcp:127.0.0.1:40000-:8470" in argv
    assert f"file:{files.serial_log}" in argv
    assert argv[argv.index("-append") + 1] == local_vm.KERNEL_CMDLINE


def test_process_alive_sees_this_process_and_not_a_dead_pid() -> None:
    import os

    assert qemu_boot.process_alive(os.getpid(), "python")
    assert not qemu_boot.process_alive(os.getpid(), "no-such-marker-in-cmdline")
    assert not qemu_boot.process_alive(2**22 + 12345)
