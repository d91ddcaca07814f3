"""Gang jobs: the machines of one ``rawvm run -n N`` run one job together, all or nothing.

Every node's task gets its place in the gang as environment variables (``gang_env``): ``RAWVM_NODE_RANK``
(0..N-1, in the cluster record's machine order), ``RAWVM_NUM_NODES``, ``RAWVM_NODE_IPS`` (one address a line, head
first: the addresses peers reach each other at, e.g. EC2 private addresses), ``RAWVM_HEAD_IP``,
``RAWVM_GPUS_PER_NODE``, ``RAWVM_NODE_PORT``/``RAWVM_NODE_PORTS`` (the port each node may listen on for its peers:
the same on every node of a real network, distinct where the nodes share one address, as local machines share
127.0.0.1) and ``MASTER_ADDR``/``MASTER_PORT`` (the head's address and port) for ``torch.distributed``. A cluster
launched with EFA (``rawvm:efa`` on its machines) also gets the libfabric/NCCL settings AWS documents for it.
``--torchrun`` wraps each node's command in ``torchrun`` with these values (``torchrun_argv``).

All or nothing (``run_gang``): when one node's task exits non-zero, or its node stops answering (spot, crash), the
laptop cancels every other node's task (``POST /v1/tasks/{id}/cancel``: SIGTERM to its process group, SIGKILL after
a grace) and the run exits non-zero, naming the node and its last lines of output. The machines then power off after
their keepalive, as after any run.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO, cast
from urllib.parse import urlsplit

from rawvm.agent.client import AgentClient, AgentError
from rawvm.providers.base import Machine

DEFAULT_PEER_PORT = 29500  # torch.distributed's usual MASTER_PORT
CANCEL_GRACE_S = 5.0
TAIL_LINES = 10
EFA_KEY = "rawvm:efa"  # a machine detail (an EC2 tag): "1" when the cluster was launched with EFA interfaces
# What AWS documents for NCCL over EFA (libfabric's efa provider, GPUDirect RDMA, fork safety, NCCL's simple
# protocol for EFA's out-of-order delivery) and sockets kept off loopback and docker bridges for bootstrap.
EFA_ENV = {
    "FI_PROVIDER": "efa",
    "FI_EFA_USE_DEVICE_RDMA": "1",
    "RDMAV_FORK_SAFE": "1",
    "NCCL_PROTO": "simple",
    "NCCL_SOCKET_IFNAME": "^lo,docker",
}
PYTHONS = ("python", "python3")


def peer_address(machine: Machine) -> str:
    """The address the cluster's other machines reach ``machine`` at: its private address where the provider
    knows one (EC2), else the host of its agent URL (local: 127.0.0.1)."""
    return machine.details.get("private_ip") or urlsplit(machine.agent_url).hostname or ""


def _loopback(address: str) -> bool:
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(address).is_loopback
    return address == "localhost"


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on this host's loopback (held open together, so none repeats)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def node_ports(ips: Sequence[str]) -> list[int]:
    """The port each node listens on for its peers: ``DEFAULT_PEER_PORT`` everywhere when every node has its own
    address; distinct free ports when they share loopback (local machines all live on this host)."""
    if len(set(ips)) == len(ips):
        return [DEFAULT_PEER_PORT] * len(ips)
    if all(_loopback(ip) for ip in ips):
        return free_ports(len(ips))
    return [DEFAULT_PEER_PORT + rank for rank in range(len(ips))]


@dataclass(frozen=True)
class Gang:
    """Where every node of a gang is: its peer address and port, by rank (head first)."""

    ips: tuple[str, ...]
    ports: tuple[int, ...]
    gpus_per_node: int = 0
    efa: bool = False

    @classmethod
    def of(cls, machines: Sequence[Machine], gpus_per_node: int = 0) -> Gang:
        ips = tuple(peer_address(m) for m in machines)
        efa = bool(machines) and all(m.details.get(EFA_KEY) == "1" for m in machines)
        return cls(ips, tuple(node_ports(ips)), gpus_per_node, efa)

    def env(self, rank: int) -> dict[str, str]:
        """The environment of node ``rank``'s task (see the module docstring)."""
        env = {
            "RAWVM_NODE_RANK": str(rank),
            "RAWVM_NUM_NODES": str(len(self.ips)),
            "RAWVM_NODE_IPS": "\n".join(self.ips),
            "RAWVM_HEAD_IP": self.ips[0],
            "RAWVM_GPUS_PER_NODE": str(self.gpus_per_node),
            "RAWVM_NODE_PORT": str(self.ports[rank]),
            "RAWVM_NODE_PORTS": "\n".join(str(p) for p in self.ports),
            "MASTER_ADDR": self.ips[0],
            "MASTER_PORT": str(self.ports[0]),
        }
        return env | (EFA_ENV if self.efa else {})

    def torchrun_argv(self, argv: Sequence[str], rank: int) -> list[str]:
        """``argv`` under ``torchrun`` for node ``rank``: one process per GPU (one on a machine without GPUs), the
        head as the static rendezvous. torchrun runs a script or ``-m module`` itself, so a leading ``python`` of
        ``argv`` is dropped."""
        command = list(argv)
        if command and command[0].rsplit("/", 1)[-1].startswith(PYTHONS) and len(command) > 1:
            command = command[1:]
        return [
            "torchrun",
            f"--nnodes={len(self.ips)}",
            f"--node-rank={rank}",
            f"--nproc-per-node={max(self.gpus_per_node, 1)}",
            f"--master-addr={self.ips[0]}",
            f"--master-port={self.ports[0]}",
            *command,
        ]


def gpus_of(status: Mapping[str, Any]) -> int:
    """The GPU count an agent's ``/v1/status`` reports."""
    count = status.get("gpu_count")
    if isinstance(count, int):
        return count
    gpus = status.get("gpus")
    return len(gpus) if isinstance(gpus, list) else 0


class TailTee:
    """A text stream that passes everything to ``out`` and keeps the last ``TAIL_LINES`` whole lines it saw (a
    failed node's last words, for the run's error message, even when the node is gone)."""

    def __init__(self, out: TextIO, tail: deque[str]) -> None:
        self._out, self._tail, self._partial = out, tail, ""

    def write(self, text: str) -> int:
        self._out.write(text)
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        self._tail.extend(lines)
        return len(text)

    def flush(self) -> None:
        self._out.flush()


@dataclass
class NodeRun:
    """One node of a running gang: its task, and how it ended."""

    rank: int
    name: str
    client: AgentClient
    task_id: str = ""
    code: int | None = None
    lost: str = ""  # why the node stopped answering (or refused its task), "" while it answers
    refused: bool = False  # the agent answered, refusing the task (e.g. torchrun not installed)
    stop: bool = False  # the gang has failed: a task that starts now must be cancelled at once
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))

    @property
    def failed(self) -> bool:
        return bool(self.lost) or (self.code is not None and self.code != 0)


@dataclass(frozen=True)
class GangResult:
    """The run's exit code (the largest node's when all succeeded; else the failed node's, 1 when it was lost or
    refused its task) and, when a node failed, one message naming it with its last lines."""

    code: int
    failure: str = ""


RunNode = Callable[[NodeRun, TextIO, TextIO], Awaitable[int]]


def failure_message(node: NodeRun) -> str:
    """``node m1 (rank 1) exited with code 3; the others were cancelled. Its last lines:`` and the lines."""
    if node.refused:
        what = f"could not start its task ({node.lost})"
    else:
        what = f"was lost ({node.lost})" if node.lost else f"exited with code {node.code}"
    lines = "".join(f"\n  {line}" for line in node.tail) or "\n  (no output)"
    return f"node {node.name} (rank {node.rank}) {what}; the other nodes' tasks were cancelled. Its last lines:{lines}"


async def run_gang(nodes: Sequence[NodeRun], run_node: RunNode, output: TextIO, error_output: TextIO) -> GangResult:
    """Run every node (``run_node`` submits, streams and waits); at the first node that fails, cancel the rest.

    ``run_node`` returns the node's exit code and sets ``task_id`` as soon as its task exists; an ``AgentError``
    from it means the node was lost."""

    async def one(node: NodeRun) -> NodeRun:
        tee_out = cast(TextIO, TailTee(output, node.tail))
        tee_err = cast(TextIO, TailTee(error_output, node.tail))
        try:
            node.code = await run_node(node, tee_out, tee_err)
        except AgentError as exc:
            node.lost, node.refused = exc.reason or str(exc), exc.status is not None
        return node

    pending = {asyncio.ensure_future(one(n)) for n in nodes}
    first_failure: NodeRun | None = None
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        failed = [t.result() for t in done if t.result().failed]
        if failed and first_failure is None:
            first_failure = min(failed, key=lambda n: n.rank)
            await cancel_others(nodes, first_failure)
    codes = [n.code if n.code is not None else 1 for n in nodes]
    if first_failure is None:
        return GangResult(max(codes, default=0))
    # The failed node's own code (a cancelled node's 143 would hide it); a lost node's run exits 1.
    return GangResult(first_failure.code or 1, failure_message(first_failure))


async def cancel_others(nodes: Sequence[NodeRun], failed: NodeRun) -> None:
    """Cancel the task of every node still running besides ``failed`` (unreachable nodes are skipped: a lost node
    powers itself off)."""

    async def cancel(node: NodeRun) -> None:
        node.stop = True  # one still submitting cancels its task itself (cancel_if_stopped)
        if node is failed or node.code is not None or node.lost or not node.task_id:
            return
        with contextlib.suppress(AgentError):
            await node.client.cancel_task(node.task_id, grace=CANCEL_GRACE_S)

    await asyncio.gather(*(cancel(n) for n in nodes))


async def cancel_if_stopped(node: NodeRun) -> None:
    """Right after ``node``'s task was submitted: cancel it when the gang failed while it was being submitted."""
    if node.stop and node.task_id:
        with contextlib.suppress(AgentError):
            await node.client.cancel_task(node.task_id, grace=CANCEL_GRACE_S)
