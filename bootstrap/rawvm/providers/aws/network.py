"""Where EC2 machines live: the default VPC's subnets, and a security group open only to the caller.

The agent port is opened to the caller's public address /32 and nothing else; SSH only when asked, and then
also only to that /32.
"""

from __future__ import annotations

import ipaddress
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from botocore.exceptions import ClientError

from rawvm.errors import RawvmError
from rawvm.providers.aws.fleet import tag_list

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


def caller_group_name(
    caller_ip: str, port: int, ssh: bool, extra_ports: Sequence[int] = (), peer_ports: tuple[int, int] | None = None
) -> str:
    """One group per caller address and port set: every cluster launched from that address shares it."""
    address = str(ipaddress.IPv4Address(caller_ip)).replace(".", "-")
    extra = "".join(f"-{p}" for p in sorted(set(extra_ports)))
    peers = f"-peers-{peer_ports[0]}-{peer_ports[1]}" if peer_ports else ""
    return f"rawvm-caller-{address}-{port}{extra}{peers}" + ("-ssh" if ssh else "")


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


def _peer_open(group: Mapping[str, Any], group_id: str, peer_ports: tuple[int, int]) -> bool:
    return any(
        rule.get("IpProtocol") == "tcp"
        and (rule.get("FromPort"), rule.get("ToPort")) == peer_ports
        and any(pair.get("GroupId") == group_id for pair in rule.get("UserIdGroupPairs", []))
        for rule in group.get("IpPermissions", [])
    )


def ensure_security_group(
    ec2: Any,
    *,
    vpc_id: str,
    caller_ip: str,
    port: int,
    ssh: bool,
    tags: Mapping[str, str],
    extra_ports: Sequence[int] = (),
    peer_ports: tuple[int, int] | None = None,
    made_by: str = "",
) -> str:
    """The caller's security group: ingress only from ``caller_ip``/32 to ``port`` (and 22 when ``ssh``, and each
    of ``extra_ports``: a Dask scheduler and dashboard), plus ``peer_ports`` from the group itself (machines of
    the caller's clusters reaching each other: Dask's workers, which also need this cluster's TLS certificate).

    It belongs to the caller's address, not to a cluster, so only the first launch from an address pays for it
    (CreateSecurityGroup + AuthorizeSecurityGroupIngress, which EC2 cannot do in one call); later clusters from
    the same address reuse it without a call that changes anything. ``rawvm down`` deletes it once no live
    instance uses it. A launcher that moves gets a new group; the old one goes with the clusters that used it.
    """
    cidr = f"{ipaddress.IPv4Address(caller_ip)}/32"
    name = caller_group_name(caller_ip, port, ssh, extra_ports, peer_ports)
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
        peers_open = False
    else:
        group_id = str(group["GroupId"])
        already = _open_ports(group, cidr)
        peers_open = bool(peer_ports) and _peer_open(group, group_id, peer_ports or (0, 0))
    permissions = [
        {
            "IpProtocol": "tcp",
            "FromPort": p,
            "ToPort": p,
            "IpRanges": [{"CidrIp": cidr, "Description": "rawvm launcher"}],
        }
        for p in sorted({port, *extra_ports, *([22] if ssh else [])})
        if p not in already
    ]
    if peer_ports and not peers_open:
        permissions.append(
            {
                "IpProtocol": "tcp",
                "FromPort": peer_ports[0],
                "ToPort": peer_ports[1],
                "UserIdGroupPairs": [{"GroupId": group_id, "Description": "rawvm cluster peers"}],
            }
        )
    if permissions:
        try:
            ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=permissions)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "InvalidPermission.Duplicate":
                raise
    return group_id
