"""What runs on a Dask cluster's machines: the scheduler and worker commands the agents run as tasks, where they
listen, and the TLS archive every machine unpacks into its work dir.

Layout: one machine runs ``python -m distributed.cli.dask_scheduler`` (and, when the cluster has no machine of
its own for it, a worker too), every other machine one worker (a GPU machine one worker per GPU, with dask-cuda
when the environment has it). Everything speaks TLS with the cluster's CA (``rawvm.dask.tls``): the scheduler's
port, the dashboard (HTTPS, and only for a client with the cluster's certificate: ``DASHBOARD_PRELOAD``), the
workers and their nannies. Workers have no dashboard of their own.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from rawvm.dask.tls import TlsFiles
from rawvm.providers.base import Machine

SCHEDULER_PORT = 8786
DASHBOARD_PORT = 8787
WORKER_PORTS = "8800:8899"  # fixed ranges, so the aws security group opens no more than this to peers
NANNY_PORTS = "8900:8999"
PEER_PORTS = (SCHEDULER_PORT, 8999)  # what a cluster's machines reach on each other (aws: from the group itself)
TLS_DIR = ".rawvm-dask"  # in the work dir on every machine
ARCHIVE_NAME = "rawvm-dask.tar.gz"  # the bundle file that carries it

# The scheduler's own ``idle_timeout`` counts only tasks; rawvm's idleness is "no tasks and no client", so a
# preload keeps the idle clock at zero while a client is connected ("fire-and-forget" is the scheduler's own).
IDLE_PRELOAD = '''"""rawvm: a connected client keeps the Dask scheduler from its idle timeout."""
from tornado.ioloop import PeriodicCallback


def dask_setup(scheduler):
    def client_keeps_alive():
        if any(name != "fire-and-forget" for name in scheduler.clients):
            scheduler.idle_since = None

    callback = PeriodicCallback(client_keeps_alive, 500)
    scheduler.periodic_callbacks["rawvm-client-keeps-alive"] = callback
    callback.start()
'''

# Dask's dashboard server takes the cluster's CA and node certificate from its config but builds its context
# with ssl.Purpose.CLIENT_AUTH, whose verify_mode is CERT_NONE: anyone who reaches the port could read task
# keys, logs and profiles. This preload makes the same context require a client certificate signed by the
# cluster's CA, then closes any connection accepted before that (the server listens from the scheduler's
# __init__, preloads run at its start), so every dashboard connection left is a verified one. The alternative,
# a dashboard bound to the machine's loopback, would leave dashboard_link reachable by nobody on the laptop.
DASHBOARD_PRELOAD = '''"""rawvm: the Dask dashboard answers only clients with the cluster's certificate (mutual TLS)."""
import ssl


async def dask_setup(scheduler):
    server = scheduler.http_server
    context = getattr(server, "ssl_options", None)
    if not isinstance(context, ssl.SSLContext):
        raise RuntimeError("rawvm: the dashboard has no TLS context; refusing to serve it in the clear")
    context.verify_mode = ssl.CERT_REQUIRED
    await server.close_all_connections()
'''


@dataclass(frozen=True)
class SchedulerPlace:
    """Where the scheduler listens on its machine and how the laptop and the workers reach it."""

    host: str  # the scheduler's --host (its listening address)
    port: int
    dashboard_port: int
    client_address: str  # tls://host:port, from the laptop
    worker_address: str  # tls://host:port, from the cluster's machines
    dashboard_link: str
    worker_host: str  # the workers' --host ("": Dask's choice, the machine's own address)


def scheduler_place(
    provider: str, machine: Machine, free_port: int = 0, free_dashboard_port: int = 0
) -> SchedulerPlace:
    """``local``: every machine is this host, so the ports are free ports of this host and everything listens on
    127.0.0.1. ``qemu``: the guest ports forwarded to the host (a qemu cluster is one VM: VMs behind user-mode
    networking cannot reach each other). ``aws``: the laptop uses the public address the security group opens
    to it, the workers the private one."""
    if provider == "local":
        client = f"tls://127.0.0.1:{free_port}"
        return SchedulerPlace(
            "127.0.0.1",
            free_port,
            free_dashboard_port,
            client,
            client,
            f"https://127.0.0.1:{free_dashboard_port}/status",
            "127.0.0.1",
        )
    if provider == "qemu":
        port = machine.details[f"port:{SCHEDULER_PORT}"]
        dashboard = machine.details[f"port:{DASHBOARD_PORT}"]
        return SchedulerPlace(
            "0.0.0.0",  # noqa: S104 - the guest's user-mode network; only the forwarded host ports reach it
            SCHEDULER_PORT,
            DASHBOARD_PORT,
            f"tls://127.0.0.1:{port}",
            f"tls://127.0.0.1:{SCHEDULER_PORT}",
            f"https://127.0.0.1:{dashboard}/status",
            "127.0.0.1",
        )
    public = machine.agent_url.split("://", 1)[-1].rsplit(":", 1)[0]
    private = machine.details.get("private_ip") or public
    return SchedulerPlace(
        "0.0.0.0",  # noqa: S104 - the security group admits only the caller's /32 and the cluster's own machines
        SCHEDULER_PORT,
        DASHBOARD_PORT,
        f"tls://{public}:{SCHEDULER_PORT}",
        f"tls://{private}:{SCHEDULER_PORT}",
        f"https://{public}:{DASHBOARD_PORT}/status",
        "",
    )


def _tls_args() -> list[str]:
    return [
        "--tls-ca-file",
        f"{TLS_DIR}/ca.pem",
        "--tls-cert",
        f"{TLS_DIR}/node.pem",
        "--tls-key",
        f"{TLS_DIR}/node.key",
    ]


def tls_env() -> dict[str, str]:
    """Dask's settings on every machine: TLS required on every comm, the dashboard served over HTTPS (with the
    client certificate required by ``DASHBOARD_PRELOAD``)."""
    return {
        "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
        "DASK_DISTRIBUTED__SCHEDULER__DASHBOARD__TLS__CA_FILE": f"{TLS_DIR}/ca.pem",
        "DASK_DISTRIBUTED__SCHEDULER__DASHBOARD__TLS__CERT": f"{TLS_DIR}/node.pem",
        "DASK_DISTRIBUTED__SCHEDULER__DASHBOARD__TLS__KEY": f"{TLS_DIR}/node.key",
        "PYTHONUNBUFFERED": "1",
    }


def scheduler_command(place: SchedulerPlace, idle_timeout_s: float) -> list[str]:
    return [
        "python",
        "-m",
        "distributed.cli.dask_scheduler",
        "--protocol",
        "tls",
        "--host",
        place.host,
        "--port",
        str(place.port),
        "--dashboard-address",
        f"{place.host}:{place.dashboard_port}",
        *_tls_args(),
        "--idle-timeout",
        f"{max(1, round(idle_timeout_s))}s",
        "--preload",
        f"{TLS_DIR}/idle.py",
        "--preload",
        f"{TLS_DIR}/dashboard.py",
    ]


@dataclass(frozen=True)
class WorkerTask:
    """One worker process to start on a machine, as an agent task."""

    name: str
    argv: list[str]
    env: dict[str, str]


def worker_tasks(
    name: str, place: SchedulerPlace, *, cores: int, gpus: int, dask_cuda: bool, fixed_ports: bool
) -> list[WorkerTask]:
    """A CPU machine: one worker ``name`` with a thread per core. A GPU machine: one worker per GPU, each seeing
    only its GPU (``name-gpuK``); dask-cuda's worker when the environment has it, else Dask's with a ``GPU=1``
    resource. ``fixed_ports``: listen in the ranges the aws group opens to peers (local machines share one host
    and take any free port)."""
    base = ["--no-dashboard", *_tls_args()]
    if place.worker_host:
        base += ["--host", place.worker_host]
    if fixed_ports:
        base += ["--worker-port", WORKER_PORTS, "--nanny-port", NANNY_PORTS]
    if gpus <= 0:
        argv = ["python", "-m", "distributed.cli.dask_worker", place.worker_address, "--name", name]
        return [WorkerTask(name, [*argv, "--nthreads", str(max(1, cores)), "--nworkers", "1", *base], tls_env())]
    threads = max(1, cores // gpus)
    tasks = []
    for gpu in range(gpus):
        gpu_name = f"{name}-gpu{gpu}"
        if dask_cuda:
            argv = ["dask", "cuda", "worker", place.worker_address, "--name", gpu_name]
            argv += ["--nthreads", str(threads), *base]
        else:
            argv = ["python", "-m", "distributed.cli.dask_worker", place.worker_address, "--name", gpu_name]
            argv += ["--nthreads", str(threads), "--nworkers", "1", "--resources", "GPU=1", *base]
        tasks.append(WorkerTask(gpu_name, argv, {**tls_env(), "CUDA_VISIBLE_DEVICES": str(gpu)}))
    return tasks


def tls_archive(tls: TlsFiles, dest: Path) -> Path:
    """The tar.gz every machine unpacks into its work dir: the CA, the node certificate and key (0600), and the
    idle and dashboard preloads. It travels as a bundle file (sha256 in the manifest), never in a task's env or
    a log."""
    members: Mapping[str, tuple[bytes, int]] = {
        f"{TLS_DIR}/ca.pem": (tls.ca.read_bytes(), 0o644),
        f"{TLS_DIR}/node.pem": (tls.node_cert.read_bytes(), 0o644),
        f"{TLS_DIR}/node.key": (tls.node_key.read_bytes(), 0o600),
        f"{TLS_DIR}/idle.py": (IDLE_PRELOAD.encode(), 0o644),
        f"{TLS_DIR}/dashboard.py": (DASHBOARD_PRELOAD.encode(), 0o644),
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        directory = tarfile.TarInfo(TLS_DIR)
        directory.type, directory.mode = tarfile.DIRTYPE, 0o700
        tar.addfile(directory)
        for member, (data, mode) in sorted(members.items()):
            info = tarfile.TarInfo(member)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    dest.write_bytes(buffer.getvalue())
    dest.chmod(0o600)
    return dest
