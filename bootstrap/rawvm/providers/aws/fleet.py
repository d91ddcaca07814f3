"""EC2 fleets: the launch template's data, ``CreateFleet`` requests, and reading their partial results.

One launch template per cluster carries everything every machine shares (image, user-data, security group,
IMDSv2, terminate-on-shutdown, encrypted root volume, tags). A launch is then ONE ``CreateFleet`` of type
``instant`` whose overrides span the chosen instance types x the default VPC's subnets (one per zone): EC2
itself moves to the next zone or type when one is short of capacity. ``spot_with_fallback`` adds a second,
on-demand fleet for the spot shortfall only.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rawvm.providers.aws import teardown
from rawvm.providers.aws.config import AWS_ERRORS

SPOT_POLICIES = ("on-demand", "spot", "spot_with_fallback")
CAPACITY_ERRORS = frozenset(
    {"InsufficientInstanceCapacity", "InsufficientCapacity", "InsufficientHostCapacity", "MaxSpotInstanceCountExceeded"}
)


def tag_list(tags: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in sorted(tags.items())]


def launch_template_data(
    *,
    image_id: str,
    root_device: str,
    root_size_gib: int,
    security_group_id: str,
    user_data: bytes,
    tags: Mapping[str, str],
    key_name: str = "",
) -> dict[str, Any]:
    """What every machine of the cluster shares. The instance type and subnet come from the fleet's overrides."""
    data: dict[str, Any] = {
        "ImageId": image_id,
        "UserData": base64.b64encode(user_data).decode(),
        "SecurityGroupIds": [security_group_id],
        # A machine that powers itself off is gone, not stopped-and-billed-for-storage.
        "InstanceInitiatedShutdownBehavior": "terminate",
        # IMDSv2 only; a hop limit of 1 keeps the credentials endpoint away from containers on the machine.
        "MetadataOptions": {"HttpTokens": "required", "HttpPutResponseHopLimit": 1, "HttpEndpoint": "enabled"},
        "BlockDeviceMappings": [
            {
                "DeviceName": root_device,
                "Ebs": {
                    "VolumeType": "gp3",
                    "VolumeSize": root_size_gib,
                    "Encrypted": True,
                    "DeleteOnTermination": True,
                },
            }
        ],
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": tag_list(tags)},
            {"ResourceType": "volume", "Tags": tag_list(tags)},
            # Tagged so that 'rawvm sweep' can tell an interface left behind is rawvm's.
            {"ResourceType": "network-interface", "Tags": tag_list(tags)},
        ],
    }
    if key_name:
        data["KeyName"] = key_name
    return data


@dataclass(frozen=True)
class Placement:
    """One override: an instance type in one subnet (= one availability zone)."""

    instance_type: str
    subnet_id: str
    zone: str


def overrides(instance_types: Sequence[str], subnets: Sequence[tuple[str, str]]) -> list[Placement]:
    """Every type in every zone; ``Priority`` follows the order of ``instance_types`` (cheapest first)."""
    return [Placement(t, subnet, zone) for t in instance_types for subnet, zone in subnets]


def fleet_request(
    *,
    launch_template_id: str,
    placements: Sequence[Placement],
    count: int,
    lifecycle: str,
    tags: Mapping[str, str],
) -> dict[str, Any]:
    """Keyword arguments of ``ec2.create_fleet`` for ``count`` machines of ``lifecycle`` (spot | on-demand)."""
    types = list(dict.fromkeys(p.instance_type for p in placements))
    request: dict[str, Any] = {
        "Type": "instant",
        "TargetCapacitySpecification": {"TotalTargetCapacity": count, "DefaultTargetCapacityType": lifecycle},
        "LaunchTemplateConfigs": [
            {
                "LaunchTemplateSpecification": {"LaunchTemplateId": launch_template_id, "Version": "$Latest"},
                "Overrides": [
                    {
                        "InstanceType": p.instance_type,
                        "SubnetId": p.subnet_id,
                        "Priority": float(types.index(p.instance_type)),
                    }
                    for p in placements
                ],
            }
        ],
        "TagSpecifications": [{"ResourceType": "fleet", "Tags": tag_list(tags)}],
    }
    if lifecycle == "spot":
        # Deepest pools at the lowest price: fewest interruptions for the money.
        request["SpotOptions"] = {"AllocationStrategy": "price-capacity-optimized"}
    else:
        # Cheapest first, by the Priority order above when prices tie.
        request["OnDemandOptions"] = {"AllocationStrategy": "prioritized"}
    return request


@dataclass(frozen=True)
class Launched:
    instance_id: str
    instance_type: str
    spot: bool
    zone: str = ""


@dataclass
class FleetResult:
    launched: list[Launched] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # "c7i.large in us-east-1a (spot): InsufficientInstanceCapacity"
    capacity_short: bool = False  # some error was a capacity error (worth falling back)


def read_fleet_response(response: Mapping[str, Any], subnet_zones: Mapping[str, str]) -> FleetResult:
    """The instances a ``CreateFleet`` (instant) started and the errors it reported, as readable lines."""
    result = FleetResult()
    for item in response.get("Instances", []):
        override = item.get("LaunchTemplateAndOverrides", {}).get("Overrides", {})
        zone = override.get("AvailabilityZone") or subnet_zones.get(override.get("SubnetId", ""), "")
        spot = item.get("Lifecycle") == "spot"
        for instance_id in item.get("InstanceIds", []):
            result.launched.append(Launched(instance_id, item.get("InstanceType", ""), spot, zone))
    for error in response.get("Errors", []):
        override = error.get("LaunchTemplateAndOverrides", {}).get("Overrides", {})
        zone = override.get("AvailabilityZone") or subnet_zones.get(override.get("SubnetId", ""), "?")
        code = str(error.get("ErrorCode", "unknown error"))
        where = f"{override.get('InstanceType', '?')} in {zone}"
        line = f"{where} ({error.get('Lifecycle', '?')}): {code}"
        if line not in result.errors:
            result.errors.append(line)
        result.capacity_short = result.capacity_short or code in CAPACITY_ERRORS
    return result


def launch_fleets(
    ec2: Any,
    template_id: str,
    placements: list[Placement],
    spot_policy: str,
    count: int,
    tags: dict[str, str],
    zones: dict[str, str],
) -> tuple[list[Launched], list[str]]:
    """CreateFleet for each lifecycle of the spot policy in turn (spot, then on demand for the shortfall); the
    machines launched and the errors of what could not be. A failed call terminates what earlier calls started."""
    plan = {"on-demand": ["on-demand"], "spot": ["spot"], "spot_with_fallback": ["spot", "on-demand"]}
    launched: list[Launched] = []
    tried: list[str] = []
    for lifecycle in plan[spot_policy]:
        short = count - len(launched)
        if short <= 0:
            break
        request = fleet_request(
            launch_template_id=template_id, placements=placements, count=short, lifecycle=lifecycle, tags=tags
        )
        try:
            response = ec2.create_fleet(**request)
        except AWS_ERRORS:
            teardown.terminate(ec2, [m.instance_id for m in launched])  # no half launch left running
            raise
        result = read_fleet_response(response, zones)
        launched.extend(result.launched[:short])
        if len(result.launched) > short:  # never keep (or pay for) more than asked
            teardown.terminate(ec2, [m.instance_id for m in result.launched[short:]])
        tried.extend(result.errors)
    return launched, tried
