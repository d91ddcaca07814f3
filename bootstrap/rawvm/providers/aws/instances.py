"""EC2 instances as the front door sees them."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from rawvm_agent.config import AgentConfig

from rawvm.providers.aws.fleet import Launched
from rawvm.providers.aws.teardown import described
from rawvm.providers.base import Machine


def machine_of(instance: dict[str, Any]) -> Machine:
    """A DescribeInstances entry as the front door's Machine (its agent URL from the address and the port tag)."""
    tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
    port = tags.get("rawvm:port") or str(AgentConfig().port)
    state = str(instance.get("State", {}).get("Name", "pending"))
    # The public address when there is one; a running machine without one (a subnet that maps none) is
    # reached at its private address, over a VPN or from inside the VPC.
    address = instance.get("PublicIpAddress") or (instance.get("PrivateIpAddress", "") if state != "pending" else "")
    launched = instance.get("LaunchTime")
    return Machine(
        id=instance["InstanceId"],
        provider="aws",
        cluster=tags.get("rawvm:cluster", ""),
        agent_url=f"https://{address}:{port}" if address else "",  # mutual TLS only (rawvm.agent.tls)
        state=state,
        instance_type=str(instance.get("InstanceType", "")),
        zone=str(instance.get("Placement", {}).get("AvailabilityZone", "")),
        spot=instance.get("InstanceLifecycle") == "spot",
        launched_at=launched.timestamp() if isinstance(launched, datetime) else 0.0,
        details={k: v for k, v in tags.items() if k.startswith("rawvm:")}
        | ({"private_ip": str(instance["PrivateIpAddress"])} if instance.get("PrivateIpAddress") else {}),
    )


def await_addresses(
    ec2: Any,
    cluster: str,
    launched: list[Launched],
    tags: Mapping[str, str],
    clock: Callable[[], float],
    sleep: Callable[[float], None],
    poll: float,
    timeout: float,
) -> list[Machine]:
    """The launched machines once each has an address to reach its agent at (or ``timeout`` passed: those still
    without one come back with an empty agent_url, and list() finds it later)."""
    launched_at = clock()
    machines = {
        m.instance_id: Machine(
            id=m.instance_id,
            provider="aws",
            cluster=cluster,
            agent_url="",
            state="pending",
            instance_type=m.instance_type,
            zone=m.zone,
            spot=m.spot,
            launched_at=launched_at,
            details={k: v for k, v in tags.items() if k.startswith("rawvm:")},
        )
        for m in launched
    }
    deadline = time.monotonic() + timeout
    waiting = list(machines)
    while waiting:
        for instance in described(ec2, waiting):
            seen = machine_of(instance)
            machines[seen.id] = dataclasses.replace(seen, launched_at=launched_at)
        waiting = [i for i, m in machines.items() if not m.agent_url and m.state in ("pending", "running")]
        if not waiting or time.monotonic() > deadline:
            break
        sleep(poll)
    return list(machines.values())
