"""``rawvm.gang`` on its own: each node's environment, the torchrun command, peer ports, and the all-or-nothing
rule when a node is lost (its agent stops answering) rather than failing."""

from __future__ import annotations

import asyncio
import io
import ssl
from typing import TextIO

from rawvm.agent.client import AgentClient, AgentError
from rawvm.gang import EFA_ENV, Gang, NodeRun, node_ports, run_gang
from rawvm.providers.base import Machine


def machine(index: int, private_ip: str = "", efa: bool = False) -> Machine:
    details = {"private_ip": private_ip} if private_ip else {}
    if efa:
        details["rawvm:efa"] = "1"
    return Machine(f"i-{index}", "aws", "c", f"https://198.51.100.{index}:8470", details=details)


def test_ec2_nodes_get_private_addresses_one_port_and_efa_settings() -> None:
    gang = Gang.of([machine(i, f"10.0.0.{i + 10}", efa=True) for i in range(2)], gpus_per_node=8)
    env = gang.env(1)
    assert env["RAWVM_NODE_IPS"] == "10.0.0.10\n10.0.0.11" and env["RAWVM_HEAD_IP"] == "10.0.0.10"
    assert (env["MASTER_ADDR"], env["MASTER_PORT"], env["RAWVM_NODE_PORT"]) == ("10.0.0.10", "29500", "29500")
    assert env["RAWVM_NODE_RANK"] == "1" and env["RAWVM_NUM_NODES"] == "2" and env["RAWVM_GPUS_PER_NODE"] == "8"
    assert EFA_ENV.items() <= env.items() and env["FI_PROVIDER"] == "efa" and env["FI_EFA_USE_DEVICE_RDMA"] == "1"
    assert "FI_PROVIDER" not in Gang.of([machine(0, "10.0.0.1")]).env(0)  # no EFA, no libfabric settings


def test_torchrun_wraps_the_command_for_each_node() -> None:
    gang = Gang.of([machine(i, f"10.0.0.{i + 10}") for i in range(2)], gpus_per_node=4)
    assert gang.torchrun_argv(["python", "train.py", "--lr", "1"], 1) == [
        "torchrun", "--nnodes=2", "--node-rank=1", "--nproc-per-node=4", "--master-addr=10.0.0.10",
        "--master-port=29500", "train.py", "--lr", "1",
    ]  # fmt: skip
    cpu = Gang.of([machine(0, "10.0.0.1")])
    tail = ["--nproc-per-node=1", "--master-addr=10.0.0.1", "--master-port=29500", "-m", "pkg.train"]
    assert cpu.torchrun_argv(["python3", "-m", "pkg.train"], 0)[3:] == tail


def test_nodes_sharing_loopback_get_distinct_free_ports() -> None:
    ports = node_ports(["127.0.0.1"] * 4)
    assert len(set(ports)) == 4 and all(p > 0 for p in ports)
    assert node_ports(["10.0.0.1", "10.0.0.2"]) == [29500, 29500]


def test_a_lost_node_cancels_nothing_it_cannot_reach_and_fails_the_run() -> None:
    client = AgentClient("https://127.0.0.1:9", "t", ssl_context=ssl.create_default_context())
    nodes = [NodeRun(0, "m0", client), NodeRun(1, "m1", client)]

    async def run_node(node: NodeRun, out: TextIO, err: TextIO) -> int:
        out.write(f"node {node.rank} starts\n")
        if node.rank == 1:
            raise AgentError("cannot reach the agent", reason="connection refused")
        return 0

    result = asyncio.run(run_gang(nodes, run_node, io.StringIO(), io.StringIO()))
    assert result.code == 1
    assert result.failure.startswith("node m1 (rank 1) was lost (connection refused)")
    assert result.failure.endswith("\n  node 1 starts")
