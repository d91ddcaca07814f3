"""The ``qemu`` provider: real Linux VMs on this host, booted from the same user-data as EC2.

Each machine is a qcow2 overlay of the cached Debian image (rawvm_images.local_vm) with a NoCloud seed holding
its user-data, run by a detached ``qemu-system-x86_64 -daemonize -no-reboot``: when the guest powers itself off,
qemu exits by itself. The agent port is forwarded to 127.0.0.1:<free port>.

Files reach the guests through a per-cluster loopback stager (rawvm.providers.staging), which a guest sees at
10.0.2.2. It runs as its own detached process (``python -m rawvm.providers.qemu serve DIR``) so that staging
and the sink outlive ``rawvm run``: the agents fetch their bundle after it returns and upload logs and
telemetry when they stop, minutes later. The server exits by itself once the cluster's VMs are all gone.
Its URLs carry a random capability (kept in ``server.json``, 0600, in the 0700 cluster directory), and it
takes uploads only to ``<machine id>.tar.gz`` of the machines launched here (their ``machines/<id>/``
directories, made before each VM starts): other local users and guests can neither read nor forge.

State, per cluster, under ``$RAWVM_STATE_DIR`` (else ``$XDG_STATE_HOME/rawvm``, else ``~/.local/state/rawvm``)
``/qemu/<cluster>/``: ``files/`` (staged), ``sink/`` (uploads), ``server.json``, and ``machines/<id>/`` with
``machine.json``, the overlay, the seed, ``serial.log`` and ``qemu.pid``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

from rawvm_agent.config import AgentConfig
from rawvm_images.local_vm import ImageError, LocalImage, ensure_image
from rawvm_images.qemu_boot import (
    BootFiles,
    choose_accel,
    free_port,
    prepare_boot,
    process_alive,
    qemu_command,
    start_detached,
)

from rawvm.agent.runtime import RuntimeTarget
from rawvm.agent.staged import stage_agent
from rawvm.agent.userdata import encode_user_data, render_user_data
from rawvm.agent.uvwheel import find_uv_wheel
from rawvm.errors import RawvmError, UsageError
from rawvm.files import place_file
from rawvm.progress import say
from rawvm.providers.base import Machine, MachineSpec, Provider
from rawvm.providers.sink_fetch import FlushCache, machine_flush_pattern
from rawvm.providers.staging import QEMU_HOST, LoopbackStager, safe_relpath

PLATFORM = "linux-x86_64"
GUEST_BIND = "0.0.0.0"  # noqa: S104 (inside the guest: qemu's user network forwards to the guest's eth0)
SERVER_START_TIMEOUT = 20.0
SERVER_IDLE_EXIT = 15 * 60.0  # a server whose cluster never launched a VM gives up after this
_CLUSTER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")

Progress = Callable[[str], None]


def default_state_root() -> Path:
    if env := os.environ.get("RAWVM_STATE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "rawvm"


class QemuProvider(Provider):
    """Real VMs under qemu (TCG, or KVM when hardware KVM works). See the module docstring."""

    name = "qemu"

    def __init__(
        self,
        state_root: Path | None = None,
        *,
        image_cache: Path | None = None,
        accel: str | None = None,
        memory_mib: int = 2048,
        cpus: int = 2,
        progress: Progress | None = None,
    ) -> None:
        self.root = (state_root or default_state_root()) / "qemu"
        self.image_cache = image_cache
        # auto: KVM only when it is hardware KVM (kvm_intel/kvm_amd), else TCG; RAWVM_QEMU_ACCEL=kvm|tcg forces one.
        self.accel = accel or os.environ.get("RAWVM_QEMU_ACCEL", "auto")
        self.memory_mib = memory_mib
        self.cpus = cpus
        # Default: one line per step on stderr, like the front door's own progress (the first image build takes
        # minutes and must not look like a hang).
        self.progress: Progress = progress or say
        self._image: LocalImage | None = None

    # -- the image ---------------------------------------------------------------------------------------------

    def image(self) -> LocalImage:
        if self._image is None:
            try:
                self._image = ensure_image(self.image_cache, self.progress)
            except ImageError as exc:
                raise RawvmError(str(exc)) from None
        return self._image

    def target_platform(self, spec: MachineSpec) -> str:
        if spec.request.arm or spec.request.gpu:
            raise UsageError("the qemu provider runs x86_64 CPU machines only: drop --arm/--gpu or use --provider aws")
        return PLATFORM

    def target_glibc(self) -> str:
        """The image's glibc (Debian 12: 2.36), for the resolver's manylinux level."""
        return self.image().glibc

    def target_python(self) -> str:
        """The image's python3 X.Y (Debian 12: 3.11): the agent's venv is made with it."""
        return self.image().python

    # -- staging and the sink ----------------------------------------------------------------------------------

    def cluster_dir(self, cluster: str) -> Path:
        if not _CLUSTER.fullmatch(cluster):
            raise UsageError(f"invalid cluster name {cluster!r}: use letters, digits, '.', '_' and '-'")
        return self.root / cluster

    def stage(self, cluster: str, files: Sequence[tuple[str, Path]], *, valid_s: float = 0.0) -> dict[str, str]:
        """Copies (hard-links) the files into the cluster's ``files/``, served by its detached stager."""
        directory = self.cluster_dir(cluster)
        base = self._ensure_server(directory)
        urls: dict[str, str] = {}
        for name, source in files:
            try:
                rel = safe_relpath(name)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            place_file(source, directory / "files" / rel)
            urls[name] = f"{base}/files/{quote(rel)}"
        return urls

    def sink_url(self, cluster: str) -> str:
        """The cluster's sink prefix; machine ``M`` PUTs ``<prefix>M.tar.gz``, landing in ``<cluster dir>/sink/``."""
        return f"{self._ensure_server(self.cluster_dir(cluster))}/sink/"

    def fetch_sink(self, cluster: str, dest: Path) -> int:
        """Unpack the cluster's flushes (one ``<machine>.tar.gz`` each in ``<cluster dir>/sink/``) into ``dest``,
        in the local sink's layout; skips those already there. Returns how many it unpacked."""
        sink = self.cluster_dir(cluster) / "sink"
        cache = FlushCache(cluster, dest)
        fetched = 0
        for archive in sorted(sink.rglob("*.tar.gz")):
            stat = archive.stat()
            source, fingerprint = archive.relative_to(sink).as_posix(), f"{stat.st_size}:{stat.st_mtime_ns}"
            if cache.has(source, fingerprint) or cache.too_big(source, stat.st_size):
                continue
            # <machine>.tar.gz may hold only that machine's flush (its label is <cluster>-<machine>).
            pattern = machine_flush_pattern(cluster, archive.name.removesuffix(".tar.gz"))
            fetched += cache.unpack(source, fingerprint, archive, pattern)
        cache.raise_errors()
        return fetched

    def _ensure_server(self, directory: Path) -> str:
        """The base URL (guest's view, with the capability) of the cluster's stager, started when not running."""
        info = _read_json(directory / "server.json")
        if not (info and info.get("capability") and process_alive(int(info["pid"]), "rawvm.providers.qemu")):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            directory.chmod(0o700)  # server.json holds the capability
            (directory / "server.json").unlink(missing_ok=True)
            info = self._start_server(directory)
        return f"http://{QEMU_HOST}:{int(info['port'])}/{info['capability']}"

    @staticmethod
    def _start_server(directory: Path) -> dict[str, Any]:
        log = (directory / "server.log").open("ab")
        with log:
            subprocess.Popen(
                [sys.executable, "-m", "rawvm.providers.qemu", "serve", str(directory)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            info = _read_json(directory / "server.json")
            if info:
                return info
            time.sleep(0.1)
        raise RawvmError(f"the qemu staging server did not start; see {directory / 'server.log'}")

    # -- machines ----------------------------------------------------------------------------------------------

    def launch(self, spec: MachineSpec) -> list[Machine]:
        image = self.image()
        self.target_platform(spec)
        directory = self.cluster_dir(spec.cluster)
        runtime = RuntimeTarget(python=image.python, arch="x86_64", glibc=image.glibc)
        agent = stage_agent(spec.agent_wheel, lambda files: self.stage(spec.cluster, files), runtime, self.progress)
        uv_wheel = find_uv_wheel()
        accel = self._accel()
        machines = []
        for _ in range(spec.count):
            machine_id = f"{spec.cluster}-{uuid.uuid4().hex[:8]}"
            config = self._machine_config(spec, machine_id)
            user_data = encode_user_data(
                render_user_data(
                    config,
                    channel=spec.server_credentials(),
                    agent=agent,
                    uv_wheel=uv_wheel,
                    extra_ca_certs=spec.request.extra_ca_certs,
                )
            )
            files = BootFiles(directory / "machines" / machine_id)
            try:
                prepare_boot(image, files, user_data, hostname=machine_id)
                pid, port, opened = self._start(image, files, accel, config.port, spec.open_ports)
            except ImageError as exc:
                raise RawvmError(f"qemu machine {machine_id}: {exc}") from None
            machine = Machine(
                id=machine_id,
                provider=self.name,
                cluster=spec.cluster,
                agent_url=f"https://127.0.0.1:{port}",  # mutual TLS only, through the host forward
                state="running",
                instance_type=f"qemu-{self.cpus}cpu-{self.memory_mib}mib",
                launched_at=time.time(),
                details={
                    "pid": str(pid),
                    "accel": accel,
                    "serial_log": str(files.serial_log),
                    "directory": str(files.directory),
                }
                | {f"port:{guest}": str(host) for guest, host in opened.items()},
            )
            (files.directory / "machine.json").write_text(json.dumps(asdict(machine), indent=2) + "\n")
            self.progress(f"{machine_id}: qemu pid {pid} ({accel}), serial console in {files.serial_log}")
            machines.append(machine)
        return machines

    def _accel(self) -> str:
        try:
            return choose_accel(self.accel)
        except ImageError as exc:
            raise UsageError(str(exc)) from None

    def _machine_config(self, spec: MachineSpec, machine_id: str) -> AgentConfig:
        agent = spec.agent
        install = agent.install
        if spec.request.extra_ca_certs and not install.native_tls:
            # The user-data adds the CAs to the system store; uv must then read that store.
            install = replace(install, native_tls=True)
        # The agent PUTs one tarball to its sink URL: each machine gets its own object under the cluster's sink.
        cluster_sink = self.sink_url(spec.cluster)
        sink = agent.sink
        if not sink or sink == cluster_sink:
            sink = f"{cluster_sink}{machine_id}.tar.gz"
        return replace(agent, machine_id=machine_id, bind=GUEST_BIND, sink=sink, install=install)

    def _start(
        self, image: LocalImage, files: BootFiles, accel: str, guest_port: int, open_ports: Sequence[int] = ()
    ) -> tuple[int, int, dict[int, int]]:
        """Boot the VM with the agent port and each of ``open_ports`` forwarded from free host ports; returns the
        qemu pid, the agent's host port and guest port -> host port for ``open_ports``."""
        last: ImageError | None = None
        for _ in range(3):  # a free port can be taken between the probe and qemu's bind
            port = free_port()
            opened = {guest: free_port() for guest in open_ports}
            argv = qemu_command(
                image,
                files,
                accel=accel,
                memory_mib=self.memory_mib,
                cpus=self.cpus,
                forwards=[(port, guest_port), *((host, guest) for guest, host in opened.items())],
            )
            try:
                return start_detached(argv, files), port, opened
            except ImageError as exc:
                last = exc
                if "hostfwd" not in str(exc) and "Could not set up host forwarding" not in str(exc):
                    raise
        assert last is not None
        raise last

    def list(self, cluster: str | None = None) -> list[Machine]:
        clusters = [cluster] if cluster else sorted(p.name for p in self.root.glob("*") if p.is_dir())
        found: list[Machine] = []
        for name in clusters:
            for path in sorted((self.cluster_dir(name) / "machines").glob("*/machine.json")):
                raw = _read_json(path)
                if not raw or raw.get("state") == "terminated":
                    continue
                machine = Machine(**raw)
                alive = process_alive(int(machine.details.get("pid", "0")), machine.details.get("directory", ""))
                machine.state = "running" if alive else "stopped"
                found.append(machine)
        return found

    def down(self, cluster: str) -> int:
        directory = self.cluster_dir(cluster)
        stopped = 0
        for path in sorted((directory / "machines").glob("*/machine.json")):
            raw = _read_json(path)
            if not raw:
                continue
            machine = Machine(**raw)
            pid = int(machine.details.get("pid", "0"))
            if _terminate(pid, machine.details.get("directory", "")):
                stopped += 1
            _release_disk(BootFiles(path.parent))
            machine.state = "terminated"
            path.write_text(json.dumps(asdict(machine), indent=2) + "\n")
        info = _read_json(directory / "server.json")
        if info:
            _terminate(int(info["pid"]), "rawvm.providers.qemu")
        shutil.rmtree(directory / "files", ignore_errors=True)
        return stopped


def _release_disk(files: BootFiles) -> None:
    """What a stopped machine no longer needs: its overlay (GBs once the venv is in) and seed (holds the token).
    The serial console log and the machine record stay, for ``rawvm ls``/``logs`` and post-mortems."""
    for leftover in (files.overlay, files.seed, files.directory / "user-data"):
        leftover.unlink(missing_ok=True)


def _terminate(pid: int, marker: str, wait: float = 10.0) -> bool:
    """SIGTERM (qemu shuts the VM down hard), then SIGKILL; False when it was not running."""
    if pid <= 0 or not process_alive(pid, marker):
        return False
    for sig, grace in ((signal.SIGTERM, wait), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not process_alive(pid, marker):
                return True
            time.sleep(0.1)
    return True


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# -- the detached staging server -------------------------------------------------------------------------------


def _cluster_pids(directory: Path) -> list[tuple[int, str]]:
    pids = []
    for path in (directory / "machines").glob("*/machine.json"):
        raw = _read_json(path)
        details = raw.get("details") if raw else None
        if isinstance(details, dict) and raw and raw.get("state") != "terminated":
            pids.append((int(details.get("pid", 0)), str(details.get("directory", ""))))
    return pids


def machine_flushes(directory: Path) -> frozenset[str]:
    """The sink names the cluster's stager accepts: one flush per machine launched (``machines/<id>/`` is made
    before its VM starts, so an agent never flushes before its name is here)."""
    return frozenset(f"{p.name}.tar.gz" for p in (directory / "machines").glob("*") if p.is_dir())


def serve(directory: Path, poll: float = 2.0) -> None:
    """Serve ``directory/files`` and receive ``directory/sink`` until the cluster's VMs are all gone."""
    stager = LoopbackStager(
        directory / "files",
        sink_dir=directory / "sink",
        url_host=QEMU_HOST,
        expected_uploads=lambda: machine_flushes(directory),
    ).start()
    info = directory / "server.json"
    tmp = info.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        json.dump({"pid": os.getpid(), "port": stager.port, "capability": stager.capability}, out)
    tmp.replace(info)
    started = time.monotonic()
    stop = False

    def on_term(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    try:
        while not stop:
            time.sleep(poll)
            pids = _cluster_pids(directory)
            if pids and not any(process_alive(pid, marker) for pid, marker in pids):
                # Every VM powered itself off (each agent PUTs to the sink before that, so uploads are done).
                for _pid, machine_dir in pids:
                    _release_disk(BootFiles(Path(machine_dir)))
                break
            if not pids and time.monotonic() - started > SERVER_IDLE_EXIT:
                break
    finally:
        stager.close()
        info.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rawvm.providers.qemu")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_parser = sub.add_parser("serve", help="serve a cluster's staged files and sink (started by the provider)")
    serve_parser.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.directory)


if __name__ == "__main__":
    main()
