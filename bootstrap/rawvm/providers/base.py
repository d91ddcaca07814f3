"""The provider protocol. A provider stages files where its machines can fetch them, launches machines whose
user-data (or, for ``local``, whose agent.toml) makes them agents, lists them, and tears them down.

Everything the front door knows about a provider is in this file; see docs/architecture.md.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from rawvm_agent.config import AgentConfig
from rawvm_resolver.target import DEFAULT_GLIBC

from rawvm.agent.tls import ServerCredentials
from rawvm.cost_guard import FleetPrice
from rawvm.errors import RawvmError
from rawvm.options import MachineRequest


@dataclass(frozen=True)
class MachineSpec:
    """What to launch: the request, and the agent config every machine gets (machine_id is filled per machine)."""

    cluster: str
    request: MachineRequest
    agent: AgentConfig
    agent_wheel: Path  # the rawvm-agent wheel to stage and install on the machine
    owner: str = ""
    # TCP ports, besides the agent's, that the caller reaches on every machine (a Dask scheduler and dashboard).
    # aws: opened to the caller's /32 only; qemu: forwarded to free host ports, ``Machine.details["port:N"]``;
    # local: nothing to do (every machine is this host).
    open_ports: tuple[int, ...] = ()
    # A TCP port range the cluster's machines reach on each other (Dask's workers and nannies); aws: allowed
    # from the security group itself.
    peer_ports: tuple[int, int] | None = None
    # The agents' TLS certificate and key and the cluster CA (``rawvm.agent.tls``), delivered to every machine as
    # 0600 files; the provider sets ``tls_cert``/``tls_key``/``tls_ca`` to where it put them. None: no launch.
    channel: ServerCredentials | None = field(default=None, repr=False)
    # Providers that number their machines (local: ``m0``, ``m1``, ...) start at this index, so a cluster's later
    # launch (a batch retry's fresh machines) never reuses an earlier machine's name, whose flushes, logs and
    # telemetry would then be mixed with its own. ``next_machine_index`` finds it.
    first_index: int = 0

    def server_credentials(self) -> ServerCredentials:
        """``channel``, which every launch needs (the agent serves only mutual TLS)."""
        if self.channel is None:
            raise RawvmError("internal: no TLS credentials for the agents (MachineSpec.channel)")
        return self.channel

    @property
    def count(self) -> int:
        """How many machines to start."""
        return self.request.n


def next_machine_index(names: Iterable[str]) -> int:
    """The first ``m<N>`` index after every numbered machine name in ``names`` (0 when there is none)."""
    taken = [int(n[1:]) for n in names if len(n) > 1 and n[0] == "m" and n[1:].isdigit()]
    return max(taken, default=-1) + 1


def short_id(machine_id: str, cluster: str) -> str:
    """``m0`` for ``<cluster>-m0``: how every laptop-side view names a machine of a cluster."""
    return machine_id.removeprefix(f"{cluster}-")


@dataclass
class Machine:
    """One launched machine as the front door sees it."""

    id: str
    provider: str
    cluster: str
    agent_url: str  # base URL of the agent API, e.g. https://127.0.0.1:51234 (mutual TLS only)
    state: str = "pending"  # provider's view: pending | running | stopped | terminated
    instance_type: str = ""
    zone: str = ""
    spot: bool = False
    price_per_hour: float = 0.0  # USD, 0 when unknown or free
    launched_at: float = 0.0  # unix time
    details: dict[str, str] = field(default_factory=dict)
    # phase name -> unix time, as the machine's agent recorded its way to the first task (boot_timings.py)
    boot_phases: dict[str, float] = field(default_factory=dict)

    @property
    def short_id(self) -> str:
        """The id without its cluster's prefix (``m0``), as output lines and flushes name the machine."""
        return short_id(self.id, self.cluster)


@dataclass(frozen=True)
class SinkPost:
    """One machine's own sink upload: the URL to POST to and the form fields (an S3 presigned POST whose policy
    names that machine's keys only). Handed to the machine over the agent API, never written into user-data."""

    url: str
    fields: dict[str, str] = field(repr=False)  # the policy and its signature: as good as a credential


class Provider(ABC):
    """What every provider is: stage files, launch machines, list them, take them down (the six abstract methods),
    plus optional hooks whose defaults here suit a provider that has nothing to say (a subclass overrides them).

    Nothing above this class probes a provider with ``getattr``: what it may offer is declared here.
    """

    name: ClassVar[str]
    """``local``, ``qemu`` or ``aws``: the name in cluster records and ``--provider``."""

    ready_timeout_s: float = 1800.0
    """How long a machine may take from launch to a serving agent before the launch counts as failed."""

    @abstractmethod
    def target_platform(self, spec: MachineSpec) -> str:
        """The resolver platform its machines run, e.g. ``linux-x86_64``."""

    @abstractmethod
    def stage(self, cluster: str, files: Sequence[tuple[str, Path]], *, valid_s: float = 0.0) -> dict[str, str]:
        """Put ``(name, local path)`` pairs where machines can fetch them; returns name -> URL. ``valid_s``: how
        long machines may need the URLs (0: only while they boot); a provider whose URLs carry a signature makes
        them expire then."""

    @abstractmethod
    def sink_url(self, cluster: str) -> str:
        """Where agents deliver logs and telemetry when they stop: a directory or a PUT URL, written into agent.toml;
        "" when each machine is handed its own upload over the agent API instead (``sink_form_for``, aws)."""

    @abstractmethod
    def launch(self, spec: MachineSpec) -> list[Machine]:
        """Start ``spec.count`` machines. Raises RawvmError with what was tried when it cannot."""

    @abstractmethod
    def list(self, cluster: str | None = None) -> list[Machine]:
        """Machines this provider knows, optionally of one cluster."""

    @abstractmethod
    def down(self, cluster: str) -> int:
        """Stop every machine of ``cluster`` and remove what was made for it; returns how many stopped."""

    # -- optional hooks ----------------------------------------------------------------------------------------

    def target_glibc(self) -> str:
        """The glibc of the machines' image, which decides the manylinux wheels the lock may pick."""
        return DEFAULT_GLIBC

    def target_python(self) -> str:
        """The Python the machines run (``3.11``); "" lets the resolver take the source environment's."""
        return ""

    def alive(self, machine: Machine) -> bool:
        """False once ``machine`` has certainly stopped (its process or VM is gone); True when it may still run,
        including when the provider cannot tell. Lets a wait for an agent end early."""
        return True

    def estimate(self, spec: MachineSpec) -> FleetPrice | None:
        """The price of launching ``spec`` (cheapest and dearest type, spot or not); None when machines cost
        nothing (local, qemu). The cost guard reads it before anything slow or billed happens."""
        return None

    def sink_form_for(self, cluster: str, machine: Machine, lifetime_s: float) -> SinkPost | None:
        """The sink upload for ``machine`` alone, valid until its backstop has powered it off (``lifetime_s``, the
        cluster's max_lifetime, plus the backstop's grace after its launch); ``session.wait_ready`` hands it to the
        machine once its agent serves. None: the machine's agent.toml already says where to flush (a directory, a
        per-machine PUT URL), which is every provider's case but aws."""
        return None

    def fetch_sink(self, cluster: str, dest: Path) -> int:
        """Bring every flush the cluster's agents sent to the sink into ``dest``, in the local provider's sink
        layout (``<label>-<UTC time>/tasks/<id>/{task.json,stdout,stderr}``, ``agent.log``, telemetry), skipping
        flushes already there; returns how many it brought. ``rawvm logs`` reads stopped machines and forgotten
        clusters from ``dest``. Providers whose agents flush straight into ``dest`` (local) keep this default."""
        return 0
