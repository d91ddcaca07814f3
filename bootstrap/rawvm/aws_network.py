"""Where EC2 machines live: the default VPC's subnets, and a security group open only to the caller.

The agent port is opened to the caller's public address /32 and nothing else; SSH only when asked, and then
also only to that /32.
"""

from __future__ import annotations

import ipaddress
import urllib.request
from collections.abc import Mapping
from typing import Any

from botocore.exceptions import ClientError

from rawvm.aws_fleet import tag_list
from rawvm.errors import RawvmError

CHECKIP_URL = "https://checkip.amazonaws.com"


def public_ip(url: str = CHECKIP_URL) -> str:
    """This machine's public IPv4 address as AWS sees it."""
    try:
        with urllib.request.urlopen(url, timeout=15) as response:  # noqa: S310 (fixed https URL)
            text = response.read().decode().strip()
        return str(ipaddress.IPv4Address(text))
    except (OSError, ValueError) as exc:
        raise RawvmError(f"cannot find this machine's public address from {url}: {exc}") from None


def default_network(ec2: Any) -> tuple[str, list[tuple[str, str]]]:
    """The default VPC's id and its default subnets as (subnet id, zone), one per zone, sorted by zone."""
    response = ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])
    found = [s for s in response.get("Subnets", []) if s.get("State", "available") == "available"]
    if not found:
        region = ec2.meta.region_name
        raise RawvmError(
            f"no default VPC subnets in {region}: create the default VPC ('aws ec2 create-default-vpc') and retry"
        )
    subnets = sorted(((s["SubnetId"], s["AvailabilityZone"]) for s in found), key=lambda pair: pair[1])
    return str(found[0]["VpcId"]), subnets


def find_security_group(ec2: Any, cluster: str) -> dict[str, Any] | None:
    response = ec2.describe_security_groups(Filters=[{"Name": "tag:rawvm:cluster", "Values": [cluster]}])
    groups: list[dict[str, Any]] = response.get("SecurityGroups", [])
    return groups[0] if groups else None


def _open_ports(group: Mapping[str, Any], cidr: str) -> set[int]:
    return {
        int(rule["FromPort"])
        for rule in group.get("IpPermissions", [])
        if rule.get("IpProtocol") == "tcp"
        and rule.get("FromPort") == rule.get("ToPort")
        and any(r.get("CidrIp") == cidr for r in rule.get("IpRanges", []))
    }


def ensure_security_group(
    ec2: Any, *, cluster: str, vpc_id: str, caller_ip: str, port: int, ssh: bool, tags: Mapping[str, str]
) -> str:
    """The cluster's security group, ingress only from ``caller_ip``/32 to ``port`` (and 22 when ``ssh``).

    A cluster launched again from the same address reuses its group without a call that changes anything.
    """
    cidr = f"{ipaddress.IPv4Address(caller_ip)}/32"
    group = find_security_group(ec2, cluster)
    if group is None:
        group_id = str(
            ec2.create_security_group(
                GroupName=f"rawvm-{cluster}",
                Description=f"rawvm cluster {cluster}: agent port from the launching machine only",
                VpcId=vpc_id,
                TagSpecifications=[{"ResourceType": "security-group", "Tags": tag_list(tags)}],
            )["GroupId"]
        )
        already: set[int] = set()
    else:
        group_id = str(group["GroupId"])
        already = _open_ports(group, cidr)
    wanted = [port, 22] if ssh else [port]
    permissions = [
        {
            "IpProtocol": "tcp",
            "FromPort": p,
            "ToPort": p,
            "IpRanges": [{"CidrIp": cidr, "Description": "rawvm launcher"}],
        }
        for p in wanted
        if p not in already
    ]
    if permissions:
        try:
            ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=permissions)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "InvalidPermission.Duplicate":
                raise
    stale = _stale_rules(group, cidr) if group is not None else []
    if stale:  # the launcher moved: its old address loses access
        ec2.revoke_security_group_ingress(GroupId=group_id, IpPermissions=stale)
    return group_id


def _stale_rules(group: Mapping[str, Any], cidr: str) -> list[dict[str, Any]]:
    stale = []
    for rule in group.get("IpPermissions", []):
        ranges = [{"CidrIp": r["CidrIp"]} for r in rule.get("IpRanges", []) if r.get("CidrIp") != cidr]
        if ranges:
            kept = {k: rule[k] for k in ("IpProtocol", "FromPort", "ToPort")}
            stale.append({**kept, "IpRanges": ranges})
    return stale
