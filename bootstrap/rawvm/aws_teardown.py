"""``rawvm down`` on EC2: terminate a cluster's instances by tag, wait until they are gone, then delete its
security group and launch template (a security group cannot go while a network interface still uses it)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from botocore.exceptions import ClientError

from rawvm.errors import RawvmError

LIVE_STATES = ("pending", "running", "stopping", "stopped", "shutting-down")
TERMINATE_BATCH = 1000  # TerminateInstances takes up to 1000 ids per call


def cluster_filters(cluster: str | None) -> list[dict[str, Any]]:
    if cluster is None:
        return [{"Name": "tag-key", "Values": ["rawvm:cluster"]}]
    return [{"Name": "tag:rawvm:cluster", "Values": [cluster]}]


def instances(ec2: Any, cluster: str | None, states: tuple[str, ...] = LIVE_STATES) -> Iterator[dict[str, Any]]:
    filters = [*cluster_filters(cluster), {"Name": "instance-state-name", "Values": list(states)}]
    for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
        for reservation in page.get("Reservations", []):
            yield from reservation.get("Instances", [])


def described(ec2: Any, instance_ids: list[str]) -> Iterator[dict[str, Any]]:
    """DescribeInstances for these ids; ids EC2 does not know yet (eventual consistency) are skipped."""
    paginator = ec2.get_paginator("describe_instances")
    for start in range(0, len(instance_ids), TERMINATE_BATCH):
        try:
            for page in paginator.paginate(InstanceIds=instance_ids[start : start + TERMINATE_BATCH]):
                for reservation in page.get("Reservations", []):
                    yield from reservation.get("Instances", [])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "InvalidInstanceID.NotFound":
                raise


def terminate(ec2: Any, instance_ids: list[str]) -> None:
    for start in range(0, len(instance_ids), TERMINATE_BATCH):
        ec2.terminate_instances(InstanceIds=instance_ids[start : start + TERMINATE_BATCH])


def down(
    ec2: Any,
    cluster: str,
    *,
    timeout: float = 900.0,
    poll: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Terminate every live instance of ``cluster``, wait for them, delete its SG and launch templates."""
    ids = [i["InstanceId"] for i in instances(ec2, cluster)]
    terminate(ec2, ids)
    deadline = clock() + timeout
    while True:
        left = [i["InstanceId"] for i in instances(ec2, cluster)]
        if not left:
            break
        if clock() > deadline:
            raise RawvmError(
                f"{len(left)} instances of cluster {cluster} are still not terminated after {timeout:.0f}s "
                f"(e.g. {left[0]}); run 'rawvm down {cluster}' again"
            )
        sleep(poll)
    _delete_security_groups(ec2, cluster, deadline, poll, sleep, clock)
    templates = ec2.describe_launch_templates(Filters=cluster_filters(cluster)).get("LaunchTemplates", [])
    for template in templates:
        ec2.delete_launch_template(LaunchTemplateId=template["LaunchTemplateId"])
    return len(ids)


def _delete_security_groups(
    ec2: Any,
    cluster: str,
    deadline: float,
    poll: float,
    sleep: Callable[[float], None],
    clock: Callable[[], float],
) -> None:
    groups = ec2.describe_security_groups(Filters=cluster_filters(cluster)).get("SecurityGroups", [])
    for group in groups:
        while True:
            try:
                ec2.delete_security_group(GroupId=group["GroupId"])
                break
            except ClientError as exc:
                # Network interfaces of just-terminated instances linger for a little while.
                if exc.response.get("Error", {}).get("Code") != "DependencyViolation" or clock() > deadline:
                    raise RawvmError(
                        f"cannot delete security group {group['GroupId']} of cluster {cluster}: "
                        f"{exc.response.get('Error', {}).get('Code')}; run 'rawvm down {cluster}' again later"
                    ) from None
                sleep(poll)
