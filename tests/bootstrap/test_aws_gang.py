"""Gang jobs on EC2, against moto in server mode (see test_aws_moto.py): a multi-node GPU launch makes a cluster
placement group and a security group of the cluster's own that admits only itself, asks for EFA interfaces for an
EFA type, and ``rawvm down`` removes them; a CPU launch (of one machine or several) makes none of them.

moto (5.2) has no placement groups: ``PlacementGroups`` below adds CreatePlacementGroup, DescribePlacementGroups
and DeletePlacementGroup to moto's own EC2 server, in memory, answering in AWS's shapes through moto's serializer
(botocore parses them as it parses AWS's). Everything else is moto's.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from moto.core.responses import ActionResult
from moto.ec2.exceptions import EC2ClientError
from moto.ec2.responses import EC2Response
from rawvm.errors import UsageError
from rawvm.gang import Gang
from rawvm.options import MachineRequest

from tests.bootstrap.test_aws_moto import REGION, MotoServer
from tests.bootstrap.test_aws_provider import make_provider, make_spec, template_data

pytestmark = pytest.mark.slow


class PlacementGroups:
    """While active, moto's EC2 server answers the three placement-group calls from an in-memory table."""

    def __init__(self) -> None:
        self.groups: dict[str, dict[str, Any]] = {}
        self.ids = itertools.count(1)

    def __enter__(self) -> PlacementGroups:
        table = self

        def create_placement_group(response: EC2Response) -> ActionResult:
            name = response._get_param("GroupName")
            if name in table.groups:
                raise EC2ClientError("InvalidPlacementGroup.Duplicate", f"The Placement Group '{name}' already exists.")
            tags = response._parse_tag_specification().get("placement-group", {})
            group = {
                "GroupName": name,
                "GroupId": f"pg-{next(table.ids):017x}",
                "State": "available",
                "Strategy": response._get_param("Strategy"),
                "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
            }
            table.groups[name] = group
            return ActionResult({"PlacementGroup": group})

        def describe_placement_groups(response: EC2Response) -> ActionResult:
            names = response._get_param("GroupNames", []) or list(table.groups)
            return ActionResult({"PlacementGroups": [table.groups[n] for n in names if n in table.groups]})

        def delete_placement_group(response: EC2Response) -> ActionResult:
            name = response._get_param("GroupName")
            if table.groups.pop(name, None) is None:
                raise EC2ClientError("InvalidPlacementGroup.Unknown", f"The Placement Group '{name}' is unknown.")
            return ActionResult({})

        self.added = [create_placement_group, describe_placement_groups, delete_placement_group]
        for method in self.added:
            setattr(EC2Response, method.__name__, method)
        return self

    def __exit__(self, *exc: object) -> None:
        for method in self.added:
            delattr(EC2Response, method.__name__)


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with PlacementGroups(), MotoServer() as server:
        yield server


def peer_group(ec2: Any, cluster: str) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = ec2.describe_security_groups(
        Filters=[{"Name": "group-name", "Values": [f"rawvm-peers-{cluster}"]}]
    )["SecurityGroups"]
    return groups


def placement_groups(ec2: Any) -> list[str]:
    return [g["GroupName"] for g in ec2.describe_placement_groups()["PlacementGroups"]]


def test_a_multi_node_gpu_launch_gets_peers_placement_and_efa_and_down_removes_them(
    moto: MotoServer, tmp_path: Path
) -> None:
    moto.reset()
    provider = make_provider(moto, tmp_path)
    ec2 = provider.client("ec2", REGION)
    machines = provider.launch(make_spec(tmp_path, "train", 2, vm_type="p4d.24xlarge", efa=True))
    assert len(machines) == 2 and {m.instance_type for m in machines} == {"p4d.24xlarge"}

    (group,) = ec2.describe_placement_groups(GroupNames=["rawvm-train"])["PlacementGroups"]
    assert group["Strategy"] == "cluster"
    assert {t["Key"]: t["Value"] for t in group["Tags"]}["rawvm:cluster"] == "train"

    (peers,) = peer_group(ec2, "train")
    rules = peers["IpPermissions"]
    assert [(r["IpProtocol"], [p["GroupId"] for p in r["UserIdGroupPairs"]]) for r in rules] == [
        ("-1", [peers["GroupId"]])
    ]  # every port, from the group's own members only
    assert not any(r.get("IpRanges") or r.get("Ipv6Ranges") or r.get("PrefixListIds") for r in rules)

    data = template_data(ec2, "train")
    assert data["Placement"] == {"GroupName": "rawvm-train"}
    assert "SecurityGroupIds" not in data  # the interface carries the groups
    (nic,) = data["NetworkInterfaces"]
    assert nic["InterfaceType"] == "efa" and nic["DeviceIndex"] == 0 and nic["AssociatePublicIpAddress"] is True
    caller_group = next(t["Value"] for t in data["TagSpecifications"][0]["Tags"] if t["Key"] == "rawvm:group")
    assert nic["Groups"] == [caller_group, peers["GroupId"]]
    assert len({m.zone for m in machines}) == 1  # a cluster placement group lives in one zone

    env = Gang.of(machines, gpus_per_node=8).env(1)
    assert env["RAWVM_NODE_IPS"].split("\n") == [m.details["private_ip"] for m in machines]
    assert env["FI_PROVIDER"] == "efa" and env["FI_EFA_USE_DEVICE_RDMA"] == "1"

    later = make_provider(moto, tmp_path)  # 'rawvm down' in another process: the instances' tags name the group
    assert later.down("train") == 2
    assert placement_groups(ec2) == []
    assert peer_group(ec2, "train") == []
    assert provider.down("train") == 0  # again: nothing left, no error


def test_cpu_launches_make_none_of_them(moto: MotoServer, tmp_path: Path) -> None:
    moto.reset()
    provider = make_provider(moto, tmp_path)
    ec2 = provider.client("ec2", REGION)
    provider.launch(make_spec(tmp_path, "one", 1, cpu=2))
    data = template_data(ec2, "one")
    assert len(data["SecurityGroupIds"]) == 1
    assert "Placement" not in data and "NetworkInterfaces" not in data
    assert placement_groups(ec2) == [] and peer_group(ec2, "one") == []

    machines = provider.launch(make_spec(tmp_path, "two", 2, cpu=2))  # several CPU machines: none either
    assert len(template_data(ec2, "two")["SecurityGroupIds"]) == 1 and peer_group(ec2, "two") == []
    assert placement_groups(ec2) == [] and "rawvm:efa" not in machines[0].details


def test_efa_takes_only_types_that_support_it(moto: MotoServer, tmp_path: Path) -> None:
    moto.reset()
    provider = make_provider(moto, tmp_path)
    with pytest.raises(UsageError, match=r"--efa: no instance type that fits supports EFA.*c7i\.large"):
        provider.choose_types(make_spec(tmp_path, "x", 2, vm_type="c7i.large", efa=True), REGION)
    chosen = provider.choose_types(make_spec(tmp_path, "x", 2, gpu=True, efa=True), REGION)
    ec2 = provider.client("ec2", REGION)
    described = ec2.describe_instance_types(InstanceTypes=[t.name for t in chosen])["InstanceTypes"]
    assert chosen and all(t["NetworkInfo"]["EfaSupported"] and t.get("GpuInfo") for t in described)
    with pytest.raises(UsageError, match="--efa needs --provider aws"):
        MachineRequest(provider="local", efa=True)
