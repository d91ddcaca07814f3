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
CALLER_TAG = "rawvm:caller"  # marks a caller's security group (value: the /32 it admits)
# The cluster whose launch created the group: if that launch failed before its launch template named the group
# (a lost answer, a refused call), 'rawvm down' of that cluster still finds the group and deletes it when unused.
MADE_BY_TAG = "rawvm:made-by"
CLUSTER_ONLY_TAGS = ("rawvm:cluster", "rawvm:expires")  # a caller's group outlives any one cluster


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


def caller_group_name(caller_ip: str, port: int, ssh: bool) -> str:
    """One group per caller address and port set: every cluster launched from that address shares it."""
    address = str(ipaddress.IPv4Address(caller_ip)).replace(".", "-")
    return f"rawvm-caller-{address}-{port}" + ("-ssh" if ssh else "")


def find_security_group(ec2: Any, vpc_id: str, name: str) -> dict[str, Any] | None:
    filters = [{"Name": "group-name", "Values": [name]}, {"Name": "vpc-id", "Values": [vpc_id]}]
    groups: list[dict[str, Any]] = ec2.describe_security_groups(Filters=filters).get("SecurityGroups", [])
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
    ec2: Any, *, vpc_id: str, caller_ip: str, port: int, ssh: bool, tags: Mapping[str, str], made_by: str = ""
) -> str:
    """The caller's security group: ingress only from ``caller_ip``/32 to ``port`` (and 22 when ``ssh``).

    It belongs to the caller's address, not to a cluster, so only the first launch from an address pays for it
    (CreateSecurityGroup + AuthorizeSecurityGroupIngress, which EC2 cannot do in one call); later clusters from
    the same address reuse it without a call that changes anything. ``rawvm down`` deletes it once no live
    instance uses it. A launcher that moves gets a new group; the old one goes with the clusters that used it.
    """
    cidr = f"{ipaddress.IPv4Address(caller_ip)}/32"
    name = caller_group_name(caller_ip, port, ssh)
    group = find_security_group(ec2, vpc_id, name)
    group_tags = {k: v for k, v in tags.items() if k not in CLUSTER_ONLY_TAGS} | {CALLER_TAG: cidr}
    if made_by:
        group_tags[MADE_BY_TAG] = made_by
    if group is None:
        group_id = str(
            ec2.create_security_group(
                GroupName=name,
                Description=f"rawvm: agent port {port} from {cidr} only (the launching machine)",
                VpcId=vpc_id,
                TagSpecifications=[{"ResourceType": "security-group", "Tags": tag_list(group_tags)}],
            )["GroupId"]
        )
        already: set[int] = set()
    else:
        group_id = str(group["GroupId"])
        already = _open_ports(group, cidr)
    permissions = [
        {
            "IpProtocol": "tcp",
            "FromPort": p,
            "ToPort": p,
            "IpRanges": [{"CidrIp": cidr, "Description": "rawvm launcher"}],
        }
        for p in ([port, 22] if ssh else [port])
        if p not in already
    ]
    if permissions:
        try:
            ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=permissions)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "InvalidPermission.Duplicate":
                raise
    return group_id
