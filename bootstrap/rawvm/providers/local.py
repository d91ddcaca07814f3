"""The ``local`` provider: each "machine" is an agent process on this host, in its own temp directory.

Layout: ``<root>/<cluster>/staged/`` holds the staged files (machines fetch them by path) and
``<root>/<cluster>/<machine>/`` one machine: agent.toml (0600), its TLS files ``tls/{agent.crt,agent.key,ca.crt}``
(0600; the agent serves only mutual TLS, on loopback too), state dir, agent.log, wrapper.pid.

Each machine runs under a small wrapper (``python -m rawvm.providers.local wrap DIR``), started in a new
session so it outlives the CLI. The wrapper runs the agent, and when the agent exits (its "power off":
``poweroff_command = []`` makes it end its own process), ends whatever the agent left behind and removes the
machine's directory. The agent gets SIGTERM if the wrapper dies (PR_SET_PDEATHSIG), so it is never orphaned;
the wrapper is a child subreaper, so it can end every process of the machine's tree.

The agent that runs is the one installed beside rawvm (the source ``spec.agent_wheel`` is built from), so a
local machine needs no package index for the agent itself. It starts with a pared-down environment, as a
fresh machine would: locale, proxies, CA settings and uv's own settings pass, credentials and the caller's
virtualenv do not.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import tomli_w
from rawvm_agent.config import AgentConfig, IdleConfig, config_to_dict
from rawvm_resolver.target import Target

from rawvm.agent.tls import write_private
from rawvm.errors import RawvmError, UsageError
from rawvm.files import private_dir, state_dir
from rawvm.providers.base import Machine, MachineSpec, Provider

if TYPE_CHECKING:  # psutil is imported where used: a warm run asks this provider nothing that needs it
    import psutil

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_STOP_GRACE_S = 10.0
# A local machine shares the host's CPU and GPUs: other people's load there is not this machine's activity,
# so only tasks and keepalives keep it alive (a threshold no reading can reach).
_UNREACHABLE_PERCENT = 101.0


_PASSED_ENV = frozenset(
    {"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "XDG_CACHE_HOME"}
    | {"SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NIX_SSL_CERT_FILE"}
    | {"HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "no_proxy", "all_proxy"}
)


def machine_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a local machine's agent starts with (see the module docstring)."""
    source = dict(os.environ if environ is None else environ)
    return {k: v for k, v in source.items() if k in _PASSED_ENV or k.startswith(("UV_", "LC_"))}


def default_root() -> Path:
    return Path(tempfile.gettempdir()) / f"rawvm-local-{os.getuid()}"


def host_target(python: str = "") -> Target:
    """This host as a resolver target: its arch, its glibc, and (by default) the running Python's X.Y."""
    arch = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}.get(
        platform.machine().lower()
    )
    if sys.platform != "linux" or arch is None:
        raise UsageError(
            f"the local provider runs Linux machines on this host, which is {sys.platform}/{platform.machine()}: "
            "use --provider qemu or aws"
        )
    libc, version = platform.libc_ver()
    if libc != "glibc" or not version:
        raise UsageError("the local provider needs a glibc-based Linux host: use --provider qemu or aws")
    major, minor = version.split(".")[:2]
    return Target(
        arch=arch, python=python or f"{sys.version_info.major}.{sys.version_info.minor}", glibc=f"{major}.{minor}"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalProvider(Provider):
    name = "local"

    def __init__(self, root: Path | None = None, python: str = "") -> None:
        self.root = root if root is not None else default_root()
        self.python = python or sys.executable  # runs the wrapper and the agent (rawvm depends on rawvm-agent)

    def target_glibc(self) -> str:
        return host_target().glibc

    def target_python(self) -> str:
        """The running Python's X.Y: the agent makes the machine's venv with the interpreter it finds here."""
        return host_target().python

    def alive(self, machine: Machine) -> bool:
        """Whether the machine's wrapper still runs (by the pid from launch: its pid file may not exist yet)."""
        return _wrapper_process(Path(machine.details.get("dir", "")), machine.details.get("pid", "")) is not None

    def target_platform(self, spec: MachineSpec) -> str:
        target = host_target()
        if spec.request.gpu or spec.request.vm_type or (spec.request.arm and target.arch != "aarch64"):
            raise UsageError(
                f"the local provider runs machines like this host ({target.platform}, no GPU choice, no types): "
                "drop --gpu/--arm/--vm-type or use --provider aws"
            )
        return target.platform

    def _ensure_root(self) -> None:
        """The root lives in a shared temp dir: it must be ours and private (the machines' tokens are inside)."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        info = self.root.lstat()
        if self.root.is_symlink() or info.st_uid != os.getuid():
            raise RawvmError(f"{self.root} is not a directory owned by you: remove it, or set TMPDIR elsewhere")
        os.chmod(self.root, 0o700)

    def _cluster_dir(self, cluster: str) -> Path:
        return self.root / cluster

    def stage(self, cluster: str, files: Sequence[tuple[str, Path]], *, valid_s: float = 0.0) -> dict[str, str]:
        """Copies into the cluster's ``staged/`` directory; machines read them by absolute path."""
        from rawvm.providers.staging import safe_relpath

        self._ensure_root()
        staged = self._cluster_dir(cluster) / "staged"
        urls = {}
        for name, source in files:
            target = staged / safe_relpath(name)
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            target.unlink(missing_ok=True)
            try:
                os.link(source, target)  # bundles can be large; the front door deletes its copy after launch
            except OSError:
                shutil.copyfile(source, target)
            urls[name] = str(target)
        return urls

    def sink_url(self, cluster: str) -> str:
        """The host's sink directory of the cluster (``rawvm.sinks.sink_dir``): each machine's agent copies its
        flush into ``<label>-<UTC>/`` there, the layout fetched flushes get. 0700, in the 0700 state dir."""
        return str(private_dir(state_dir() / "sinks" / cluster))

    @staticmethod
    def _write_channel(spec: MachineSpec, machine_dir: Path, config: AgentConfig) -> AgentConfig:
        """The agent's certificate, key and CA as 0600 files in a 0700 ``tls/`` of the machine; ``config`` serving
        them."""
        credentials = spec.server_credentials()
        directory = machine_dir / "tls"
        directory.mkdir(mode=0o700)
        for path, data in credentials.files(str(directory)):
            write_private(Path(path), data)
        return credentials.configure(config, str(directory))

    def machine_config(self, spec: MachineSpec, machine_id: str, machine_dir: Path, port: int) -> AgentConfig:
        idle: IdleConfig = dataclasses.replace(
            spec.agent.idle,
            poweroff_command=(),
            cpu_threshold=_UNREACHABLE_PERCENT,
            gpu_threshold=_UNREACHABLE_PERCENT,
        )
        return dataclasses.replace(
            spec.agent,
            cluster=spec.cluster,
            machine_id=machine_id,
            bind="127.0.0.1",
            port=port,
            state_dir=str(machine_dir / "state"),
            sink=spec.agent.sink or self.sink_url(spec.cluster),
            idle=idle,
            # the host's CPU and memory are everyone's: each machine reports its own process tree's
            telemetry=dataclasses.replace(spec.agent.telemetry, scope="process-tree"),
        )

    def launch(self, spec: MachineSpec) -> list[Machine]:
        if not (spec.agent.token_sha256 or spec.agent.token):
            raise RawvmError("internal: the agent config has no token")
        spec.server_credentials()  # refused before any machine dir exists
        self._ensure_root()
        cluster_dir = self._cluster_dir(spec.cluster)
        cluster_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        prepared = []
        for index in range(spec.count):  # every machine dir exists before any wrapper can clean up the cluster
            machine_id = f"m{spec.first_index + index}"
            machine_dir = cluster_dir / machine_id
            machine_dir.mkdir(mode=0o700)
            port = free_port()
            config = self.machine_config(spec, machine_id, machine_dir, port)
            if config.batch.spec_url and config.batch.index < 0:  # its batch share: its place in this launch
                config = dataclasses.replace(config, batch=dataclasses.replace(config.batch, index=index))
            config = self._write_channel(spec, machine_dir, config)
            config_path = machine_dir / "agent.toml"
            fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                tomli_w.dump(config_to_dict(config), f)
            prepared.append((machine_id, machine_dir, port))
        machines = []
        for machine_id, machine_dir, port in prepared:
            with (machine_dir / "agent.log").open("ab") as log:
                proc = subprocess.Popen(
                    [self.python, "-m", "rawvm.providers.local", "wrap", str(machine_dir)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # outlives the CLI and its terminal's signals
                    close_fds=True,
                    env=machine_environment(),
                )
            machines.append(
                Machine(
                    id=f"{spec.cluster}-{machine_id}",
                    provider=self.name,
                    cluster=spec.cluster,
                    agent_url=f"https://127.0.0.1:{port}",
                    state="running",
                    instance_type="local",
                    launched_at=time.time(),
                    details={"pid": str(proc.pid), "dir": str(machine_dir)},
                )
            )
        return machines

    def list(self, cluster: str | None = None) -> list[Machine]:
        if not self.root.is_dir():
            return []
        clusters = [cluster] if cluster else sorted(p.name for p in self.root.iterdir() if p.is_dir())
        found = []
        for name in clusters:
            for machine_dir in sorted(self._cluster_dir(name).glob("m*")):
                wrapper = _wrapper_process(machine_dir)
                config = machine_dir / "agent.toml"
                port = _port_of(config)
                found.append(
                    Machine(
                        id=f"{name}-{machine_dir.name}",
                        provider=self.name,
                        cluster=name,
                        agent_url=f"https://127.0.0.1:{port}" if port else "",
                        state="running" if wrapper else "terminated",
                        instance_type="local",
                        launched_at=wrapper.create_time() if wrapper else 0.0,
                        details={"pid": str(wrapper.pid) if wrapper else "", "dir": str(machine_dir)},
                    )
                )
        return found

    def down(self, cluster: str) -> int:
        import psutil

        cluster_dir = self._cluster_dir(cluster)
        stopped = 0
        wrappers = []
        for machine_dir in sorted(cluster_dir.glob("m*")):
            wrapper = _wrapper_process(machine_dir)
            if wrapper is not None:
                wrappers.append(wrapper)
                wrapper.send_signal(signal.SIGTERM)  # the wrapper ends the agent's tree, then removes the dir
                stopped += 1
        _, alive = psutil.wait_procs(wrappers, timeout=_STOP_GRACE_S + 5)
        for proc in alive:  # a wrapper that did not finish: end its whole session ourselves
            _kill_session(proc.pid)
        shutil.rmtree(cluster_dir, ignore_errors=True)
        return stopped


def _port_of(config: Path) -> int:
    import tomllib

    try:
        return int(tomllib.loads(config.read_text()).get("port", 0))
    except (OSError, ValueError):
        return 0


def _wrapper_process(machine_dir: Path, pid_text: str = "") -> psutil.Process | None:
    """The live wrapper of ``machine_dir``: the recorded pid, checked against its command line (pids recycle)."""
    import psutil

    try:
        pid = int(pid_text or (machine_dir / "wrapper.pid").read_text())
        proc = psutil.Process(pid)
        if str(machine_dir) in proc.cmdline() and proc.status() != psutil.STATUS_ZOMBIE:
            return proc
    except (OSError, ValueError, psutil.Error):
        pass
    return None


def _kill_session(sid: int) -> None:
    import psutil

    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getsid(proc.pid) == sid:
                proc.kill()
        except (OSError, psutil.Error):
            continue


# --- the wrapper, running detached: ``python -m rawvm.providers.local wrap DIR`` ---------------------------


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(option, value, 0, 0, 0)


def _end_tree(grace: float) -> None:
    """Terminate every descendant (the subreaper collects orphans too), then kill what is left."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(children, timeout=grace)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(alive, timeout=2)


def _remove_machine(machine_dir: Path) -> None:
    shutil.rmtree(machine_dir, ignore_errors=True)
    cluster_dir = machine_dir.parent
    if not any(cluster_dir.glob("m*")):  # the last machine of the cluster takes the staged files with it
        shutil.rmtree(cluster_dir, ignore_errors=True)


def wrap(machine_dir: Path) -> int:
    (machine_dir / "wrapper.pid").write_text(str(os.getpid()))
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    agent = subprocess.Popen(
        [sys.executable, "-m", "rawvm_agent", "--config", str(machine_dir / "agent.toml")],
        cwd=machine_dir,
        stdin=subprocess.DEVNULL,
        preexec_fn=lambda: _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM),  # single-threaded parent: safe
    )

    def on_term(signum: int, frame: object) -> None:
        agent.terminate()  # the agent leaves cleanly on SIGTERM; the tree and the dir go below

    signal.signal(signal.SIGTERM, on_term)
    try:
        code = agent.wait(timeout=None)
    except KeyboardInterrupt:
        agent.terminate()
        code = agent.wait()
    print(f"rawvm local: agent exited with {code}; ending its process tree and removing {machine_dir}", flush=True)
    _end_tree(grace=_STOP_GRACE_S)
    _remove_machine(machine_dir)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "wrap":
        print("usage: python -m rawvm.providers.local wrap MACHINE_DIR", file=sys.stderr)
        return 2
    return wrap(Path(args[1]))


if __name__ == "__main__":
    sys.exit(main())
