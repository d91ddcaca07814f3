"""Booting the local VM image under qemu: accelerator choice, per-boot overlay and NoCloud seed, the command line.

Small pure functions (the command is data, tests read it) plus thin wrappers around qemu-img, cloud-localds and
a detached ``qemu-system-x86_64 -daemonize``. See shared/vm-facts.md for why KVM is only used when it really is
hardware virtualisation.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rawvm_images.local_vm import ImageError, LocalImage, require_tools

TCG = "tcg,thread=multi"
KVM = "kvm"
HARDWARE_KVM_MODULES = ("kvm_intel", "kvm_amd")


def hardware_kvm(sys_module: Path = Path("/sys/module"), dev: Path = Path("/dev/kvm")) -> bool:
    """True when /dev/kvm is usable and backed by hardware virtualisation (kvm_intel or kvm_amd).

    A software hypervisor such as ``kvm_pvm`` also provides /dev/kvm, but a stock kernel does not boot under it.
    """
    if not dev.exists() or not os.access(dev, os.R_OK | os.W_OK):
        return False
    return any((sys_module / name).is_dir() for name in HARDWARE_KVM_MODULES)


def choose_accel(requested: str = "auto") -> str:
    """``auto``: KVM when hardware KVM works, else TCG. ``kvm``/``tcg`` force one (``kvm`` if you know better)."""
    if requested == "auto":
        return KVM if hardware_kvm() else TCG
    if requested == "kvm":
        return KVM
    if requested == "tcg":
        return TCG
    raise ImageError(f"unknown qemu accelerator {requested!r}: use auto, kvm or tcg")


@dataclass(frozen=True)
class BootFiles:
    """What one boot needs beside the cached image; all live in one per-machine directory."""

    directory: Path

    @property
    def overlay(self) -> Path:
        return self.directory / "disk.qcow2"

    @property
    def seed(self) -> Path:
        return self.directory / "seed.img"

    @property
    def serial_log(self) -> Path:
        return self.directory / "serial.log"

    @property
    def qemu_log(self) -> Path:
        return self.directory / "qemu.log"

    @property
    def pidfile(self) -> Path:
        return self.directory / "qemu.pid"


def meta_data(hostname: str, instance_id: str | None = None) -> str:
    """NoCloud meta-data. A fresh instance-id per boot, or cloud-init skips its per-instance modules."""
    return f"instance-id: {instance_id or 'i-' + uuid.uuid4().hex}\nlocal-hostname: {hostname}\n"


def prepare_boot(image: LocalImage, files: BootFiles, user_data: str | bytes, hostname: str) -> None:
    """The qcow2 overlay over the pristine raw disk, and the NoCloud seed with this boot's user-data."""
    require_tools(("qemu-img", "cloud-localds"))
    files.directory.mkdir(parents=True, exist_ok=True)
    ud = files.directory / "user-data"
    ud.write_bytes(user_data.encode() if isinstance(user_data, str) else user_data)
    ud.chmod(0o600)  # it holds the agent's token
    md = files.directory / "meta-data"
    md.write_text(meta_data(hostname))
    _check(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image.disk), "-F", "raw", str(files.overlay)])
    _check(["cloud-localds", str(files.seed), str(ud), str(md)])
    files.seed.chmod(0o600)


def free_port() -> int:
    """A TCP port free on loopback now (qemu binds it a moment later; launch retries on a clash)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def qemu_command(
    image: LocalImage,
    files: BootFiles,
    *,
    accel: str = TCG,
    memory_mib: int = 2048,
    cpus: int = 2,
    forwards: Sequence[tuple[int, int]] = (),
    daemonize: bool = True,
) -> list[str]:
    """The qemu command line. ``forwards``: (host port on 127.0.0.1, guest port). ``-no-reboot``: a power-off
    or reboot inside the guest makes qemu exit by itself, so a machine that stops leaves no process behind."""
    netdev = "user,id=n0" + "".join(f",hostfwd=tcp:127.0.0.1:{host}-:{guest}" for host, guest in forwards)
    cpu = "host" if accel == KVM else "max"
    argv = [
        "qemu-system-x86_64",
        "-accel",
        accel,
        "-cpu",
        cpu,
        "-m",
        str(memory_mib),
        "-smp",
        str(cpus),
        "-display",
        "none",
        "-monitor",
        "none",
        "-no-reboot",
        "-serial",
        f"file:{files.serial_log}",
        "-kernel",
        str(image.kernel),
        "-initrd",
        str(image.initrd),
        "-append",
        image.cmdline,
        "-drive",
        f"file={files.overlay},if=virtio,format=qcow2",
        "-drive",
        f"file={files.seed},if=virtio,format=raw",
        "-netdev",
        netdev,
        "-device",
        "virtio-net-pci,netdev=n0",
        "-pidfile",
        str(files.pidfile),
    ]
    if daemonize:
        argv.append("-daemonize")
    return argv


def start_detached(argv: Sequence[str], files: BootFiles) -> int:
    """Start qemu with ``-daemonize`` in a new session (it outlives the caller); returns qemu's pid.

    qemu's parent returns once the VM is set up, so errors such as a port clash come back as an exit code.
    """
    require_tools(("qemu-system-x86_64",))
    with files.qemu_log.open("ab") as log:
        result = subprocess.run(
            list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, check=False
        )
    if result.returncode != 0:
        tail = files.qemu_log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise ImageError(f"qemu failed to start (exit {result.returncode}): {tail[0]}")
    return int(files.pidfile.read_text().strip())


def process_alive(pid: int, marker: str = "") -> bool:
    """Whether ``pid`` runs (zombies count as gone) and, when given, its command line contains ``marker``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    if state in ("Z", "X"):
        return False
    return marker in cmdline


def _check(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ImageError(f"{argv[0]} failed: {tail[0]}")
