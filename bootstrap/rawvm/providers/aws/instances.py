"""EC2 instances as the front door sees them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rawvm_agent.config import AgentConfig

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
