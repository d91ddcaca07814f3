"""Machines of one EC2 cluster reaching each other, for gang jobs (``rawvm.gang``): a cluster's own security group,
a cluster placement group, and EFA interfaces.

- **Peers.** A launch of several GPU (or ``--efa``) machines gets a security group of its own,
  ``rawvm-peers-<cluster>``, whose only ingress rule refers to the group itself: its members reach each other on
  every port and protocol, and nothing more is opened to the world (the caller's group still admits only the
  caller's /32 on the agent port). It is tagged with the cluster, so ``rawvm down`` deletes it with the cluster's
  other groups. Several CPU machines get none of this (a thousand batch machines need no path to each other).
- **Placement.** The same launch goes into a cluster placement group, ``rawvm-<cluster>`` (close
  together in one zone, for NCCL's bandwidth and latency); the fleet is then offered the first zone's subnet only,
  since a cluster placement group cannot span zones. ``rawvm down`` (``remove``) deletes it.
- **EFA.** With ``--efa`` only types whose DescribeInstanceTypes says ``EfaSupported`` are chosen, and the launch
  template asks for the primary interface as an EFA interface (one, on network card 0: the cards of p4d/p5 beyond
  the first are left unused). The machines carry ``rawvm:efa=1``, from which every task gets the NCCL/libfabric
  settings (``rawvm.gang.EFA_ENV``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError
from rawvm_images.instance_types import InstanceType

from rawvm.errors import UsageError
from rawvm.providers.aws.fleet import tag_list
from rawvm.providers.base import MachineSpec

PEER_GROUP_PREFIX = "rawvm-peers-"
PLACEMENT_PREFIX = "rawvm-"
EFA_TAG = "rawvm:efa"
PLACEMENT_TAG = "rawvm:placement-group"  # on the instances: the placement group 'rawvm down' deletes after them
ALL_TYPES = 100_000  # a limit that keeps every fitting type, for the EFA filter to choose from


@dataclass(frozen=True)
class PeerPlan:
    """What a launch adds for its machines to work together; the defaults add nothing (one machine, or CPU: a
    thousand batch machines need no path to each other, and pay no extra call)."""

    group_id: str = ""  # the cluster's own group (members reach each other on every port); "" for one machine
    placement_group: str = ""  # the cluster placement group's name; "" unless several GPU machines
    efa: bool = False  # the primary interface is an EFA interface

    @property
    def tags(self) -> dict[str, str]:
        """Tags every machine carries: ``rawvm:efa`` tells the laptop to set NCCL up for EFA, and the placement
        group's name tells ``rawvm down`` what to delete once the instances are gone."""
        return ({EFA_TAG: "1"} if self.efa else {}) | (
            {PLACEMENT_TAG: self.placement_group} if self.placement_group else {}
        )


def efa_supported(ec2: Any, names: Sequence[str]) -> set[str]:
    """Which of ``names`` support EFA, as DescribeInstanceTypes says (``NetworkInfo.EfaSupported``)."""
    supported: set[str] = set()
    for start in range(0, len(names), 100):  # the call takes up to 100 names
        answer = ec2.describe_instance_types(InstanceTypes=list(names[start : start + 100]))
        for item in answer.get("InstanceTypes", []):
            if item.get("NetworkInfo", {}).get("EfaSupported"):
                supported.add(str(item["InstanceType"]))
    return supported


def with_efa(ec2: Any, chosen: Sequence[InstanceType], limit: int) -> list[InstanceType]:
    """The first ``limit`` of ``chosen`` (cheapest first) that support EFA; a usage error when none does."""
    supported = efa_supported(ec2, [t.name for t in chosen])
    kept = [t for t in chosen if t.name in supported][:limit]
    if not kept:
        names = ", ".join(t.name for t in chosen[:5]) + (", ..." if len(chosen) > 5 else "")
        raise UsageError(
            f"--efa: no instance type that fits supports EFA ({names or 'none fits'}); "
            "ask for one with --vm-type, e.g. p4d.24xlarge or p5.48xlarge"
        )
    return kept


def ensure_peer_group(ec2: Any, vpc_id: str, cluster: str, tags: Mapping[str, str]) -> str:
    """The cluster's own security group, whose one ingress rule admits the group itself on every port."""
    name = f"{PEER_GROUP_PREFIX}{cluster}"
    filters = [{"Name": "group-name", "Values": [name]}, {"Name": "vpc-id", "Values": [vpc_id]}]
    found = ec2.describe_security_groups(Filters=filters).get("SecurityGroups", [])
    if found:
        return str(found[0]["GroupId"])
    group_id = str(
        ec2.create_security_group(
            GroupName=name,
            Description=f"rawvm: machines of cluster {cluster} reach each other on every port",
            VpcId=vpc_id,
            TagSpecifications=[{"ResourceType": "security-group", "Tags": tag_list(tags)}],
        )["GroupId"]
    )
    rule = {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group_id, "Description": "rawvm cluster peers"}]}
    try:
        ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=[rule])
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "InvalidPermission.Duplicate":
            raise
    return group_id


def ensure_placement_group(ec2: Any, cluster: str, tags: Mapping[str, str]) -> str:
    """The cluster placement group ``rawvm-<cluster>`` (made once; a second launch into the cluster reuses it)."""
    name = f"{PLACEMENT_PREFIX}{cluster}"
    try:
        ec2.create_placement_group(
            GroupName=name,
            Strategy="cluster",
            TagSpecifications=[{"ResourceType": "placement-group", "Tags": tag_list(tags)}],
        )
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "InvalidPlacementGroup.Duplicate":
            raise
    return name


def plan(ec2: Any, spec: MachineSpec, chosen: Sequence[InstanceType], vpc_id: str, tags: Mapping[str, str]) -> PeerPlan:
    """Make what ``spec``'s machines need to work together (see the module docstring)."""
    gang = spec.count > 1 and (spec.request.gpu or spec.request.efa or any(t.gpus for t in chosen))
    group_tags = {**tags, "rawvm:made-by": spec.cluster}
    return PeerPlan(
        group_id=ensure_peer_group(ec2, vpc_id, spec.cluster, group_tags) if gang else "",
        placement_group=ensure_placement_group(ec2, spec.cluster, tags) if gang else "",
        efa=spec.request.efa,
    )


def amend_template(data: Mapping[str, Any], peers: PeerPlan) -> dict[str, Any]:
    """The launch template data with the peer group, the placement group and the EFA interface added."""
    out = copy.deepcopy(dict(data))
    groups = [*out.pop("SecurityGroupIds", []), *([peers.group_id] if peers.group_id else [])]
    if peers.placement_group:
        out["Placement"] = {"GroupName": peers.placement_group}
    if peers.efa:  # an interface of the template carries the groups (EC2 refuses both at once)
        out["NetworkInterfaces"] = [
            {
                "DeviceIndex": 0,
                "NetworkCardIndex": 0,
                "InterfaceType": "efa",
                "Groups": groups,
                "AssociatePublicIpAddress": True,  # the laptop reaches the agent at the public address
                "DeleteOnTermination": True,
            }
        ]
    else:
        out["SecurityGroupIds"] = groups
    return out


def subnets_for(peers: PeerPlan, subnets: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The subnets the fleet may use: the first zone's only in a cluster placement group (one zone), else all."""
    return list(subnets[:1]) if peers.placement_group else list(subnets)


def placement_groups_of(instances: Iterable[Mapping[str, Any]]) -> set[str]:
    """The placement groups ``instances`` (DescribeInstances entries) name in their ``rawvm:placement-group`` tag."""
    return {str(t["Value"]) for i in instances for t in i.get("Tags", []) if t["Key"] == PLACEMENT_TAG}


def remove(ec2: Any, names: Iterable[str]) -> None:
    """Delete these placement groups (a cluster's, once its instances have terminated); one already gone is fine.
    Only groups the cluster is known to have are asked for, so a cluster without one costs no call."""
    for name in sorted(set(names)):
        try:
            ec2.delete_placement_group(GroupName=name)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "InvalidPlacementGroup.Unknown":
                raise
