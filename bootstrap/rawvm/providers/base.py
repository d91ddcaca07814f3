"""The provider protocol. A provider stages files where its machines can fetch them, launches machines whose
user-data (or, for ``local``, whose agent.toml) makes them agents, lists them, and tears them down.

Everything the front door knows about a provider is in this file; see docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from rawvm_agent.config import AgentConfig


@dataclass(frozen=True)
class MachineSpec:
    """What to launch. ``agent`` is the agent config every machine gets (machine_id is filled per machine)."""

    cluster: str
    count: int
    agent: AgentConfig
    agent_wheel: Path  # the rawvm-agent wheel to stage and install on the machine
    vm_type: str = ""  # explicit instance type; empty: choose from the resources below
    cpu: int = 0
    memory_gib: float = 0.0
    gpu: bool = False
    arm: bool = False
    region: str = ""
    spot_policy: str = "on-demand"  # on-demand | spot | spot_with_fallback
    extra_ca_certs: tuple[Path, ...] = ()  # PEM files the machine must trust (TLS-intercepting proxies)
    owner: str = ""
    # TCP ports, besides the agent's, that the caller reaches on every machine (a Dask scheduler and dashboard).
    # aws: opened to the caller's /32 only; qemu: forwarded to free host ports, ``Machine.details["port:N"]``;
    # local: nothing to do (every machine is this host).
    open_ports: tuple[int, ...] = ()
    # A TCP port range the cluster's machines reach on each other (Dask's workers and nannies); aws: allowed
    # from the security group itself.
    peer_ports: tuple[int, int] | None = None


def short_id(machine_id: str, cluster: str) -> str:
    """``m0`` for ``<cluster>-m0``: how every laptop-side view names a machine of a cluster."""
    return machine_id.removeprefix(f"{cluster}-")


@dataclass
class Machine:
    """One launched machine as the front door sees it."""

    id: str
    provider: str
    cluster: str
    agent_url: str  # base URL of the agent API, e.g. http://127.0.0.1:51234
    state: str = "pending"  # provider's view: pending | running | stopped | terminated
    instance_type: str = ""
    zone: str = ""
    spot: bool = False
    price_per_hour: float = 0.0  # USD, 0 when unknown or free
    launched_at: float = 0.0  # unix time
    details: dict[str, str] = field(default_factory=dict)

    @property
    def short_id(self) -> str:
        """The id without its cluster's prefix (``m0``), as output lines and flushes name the machine."""
        return short_id(self.id, self.cluster)


@runtime_checkable
class Provider(Protocol):
    """What every provider has. Optional hooks, which the front door calls through ``getattr`` when present:
    ``target_glibc()``, ``target_python()``, ``alive(machine)``, ``ready_timeout_s``, and

    ``fetch_sink(cluster: str, dest: Path) -> int``: bring every flush the cluster's agents sent to the sink into
    ``dest``, in the local provider's sink layout (``<label>-<UTC time>/tasks/<id>/{task.json,stdout,stderr}``,
    ``agent.log``, telemetry), skipping flushes already there; returns how many it brought. ``rawvm logs`` reads
    stopped machines and forgotten clusters from ``dest``. Providers whose sink is that directory need none.
    """

    name: str

    def target_platform(self, spec: MachineSpec) -> str:
        """The resolver platform its machines run, e.g. ``linux-x86_64``."""
        ...

    def stage(self, cluster: str, files: Sequence[tuple[str, Path]]) -> dict[str, str]:
        """Put ``(name, local path)`` pairs where machines can fetch them; returns name -> URL."""
        ...

    def sink_url(self, cluster: str) -> str:
        """Where agents deliver logs and telemetry when they stop: a directory, a PUT URL, or a POST URL whose form
        fields the provider adds to the agent config (aws: ``sink_form``)."""
        ...

    def launch(self, spec: MachineSpec) -> list[Machine]:
        """Start ``spec.count`` machines. Raises RawvmError with what was tried when it cannot."""
        ...

    def list(self, cluster: str | None = None) -> list[Machine]:
        """Machines this provider knows, optionally of one cluster."""
        ...

    def down(self, cluster: str) -> int:
        """Stop every machine of ``cluster`` and remove what was made for it; returns how many stopped."""
        ...
