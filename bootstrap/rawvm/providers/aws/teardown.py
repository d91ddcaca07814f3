"""``rawvm down`` on EC2: terminate a cluster's instances by tag, wait until they are gone, then delete any launch
template left (a launch deletes its own once the fleets answered), and the caller's security group its instances
used once no live instance uses it any more (a security
group cannot go while a network interface still uses it; other clusters from the same address may share it)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from botocore.exceptions import ClientError

from rawvm.errors import RawvmError

LIVE_STATES = ("pending", "running", "stopping", "stopped", "shutting-down")
GROUP_TAG = "rawvm:group"  # on every instance: the caller group its launch used (the launch template is gone)
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
    found = list(instances(ec2, cluster, (*LIVE_STATES, "terminated")))
    ids = [i["InstanceId"] for i in found if i.get("State", {}).get("Name") != "terminated"]
    # The launch deleted its template: the instances' rawvm:group tag names the caller group it used (terminated
    # instances for about an hour; after that 'rawvm sweep' finds a group that nothing uses). Only that tag: an
    # instance's own group list may hold groups rawvm did not make (the VPC's default).
    used = {t["Value"] for i in found for t in i.get("Tags", []) if t["Key"] == GROUP_TAG}
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
    templates = ec2.describe_launch_templates(Filters=cluster_filters(cluster)).get("LaunchTemplates", [])
    group_ids = sorted(used | {g for t in templates for g in template_groups(ec2, t["LaunchTemplateId"])})
    for template in templates:
        ec2.delete_launch_template(LaunchTemplateId=template["LaunchTemplateId"])
    cluster_groups = ec2.describe_security_groups(Filters=cluster_filters(cluster)).get("SecurityGroups", [])
    # A group this cluster's launch made but never got to name in a template (that launch failed in between).
    made = [{"Name": "tag:rawvm:made-by", "Values": [cluster]}]
    cluster_groups += ec2.describe_security_groups(Filters=made).get("SecurityGroups", [])
    extra = list(dict.fromkeys(g["GroupId"] for g in cluster_groups if g["GroupId"] not in group_ids))
    for group_id in [*group_ids, *extra]:
        if not _in_use(ec2, group_id):
            _delete_security_group(ec2, group_id, cluster, deadline, poll, sleep, clock)
    return len(ids)


def template_groups(ec2: Any, template_id: str) -> set[str]:
    """The security groups any version of a launch template names (a relaunch from a new address adds one)."""
    groups: set[str] = set()
    pages = ec2.get_paginator("describe_launch_template_versions").paginate(LaunchTemplateId=template_id)
    for page in pages:
        for version in page.get("LaunchTemplateVersions", []):
            data = version.get("LaunchTemplateData", {})
            groups.update(data.get("SecurityGroupIds", []))
            groups.update(g for nic in data.get("NetworkInterfaces", []) for g in nic.get("Groups", []))  # EFA
    return groups


def _in_use(ec2: Any, group_id: str) -> bool:
    """Whether another cluster still needs the group: a remaining rawvm launch template names it (a launch in
    progress), or a live instance uses it (or names it in its ``rawvm:group`` tag)."""
    pages = ec2.get_paginator("describe_launch_templates").paginate(Filters=cluster_filters(None))
    if any(group_id in template_groups(ec2, t["LaunchTemplateId"]) for p in pages for t in p["LaunchTemplates"]):
        return True
    live = {"Name": "instance-state-name", "Values": list(LIVE_STATES)}
    for using in (
        {"Name": "instance.group-id", "Values": [group_id]},
        {"Name": f"tag:{GROUP_TAG}", "Values": [group_id]},
    ):
        response = ec2.describe_instances(Filters=[using, live])
        if any(r.get("Instances") for r in response.get("Reservations", [])):
            return True
    return False


def _delete_security_group(
    ec2: Any,
    group_id: str,
    cluster: str,
    deadline: float,
    poll: float,
    sleep: Callable[[float], None],
    clock: Callable[[], float],
) -> None:
    while True:
        try:
            ec2.delete_security_group(GroupId=group_id)
            return
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code == "InvalidGroup.NotFound":
                return  # another 'rawvm down' got there first
            # Network interfaces of just-terminated instances linger for a little while.
            if code != "DependencyViolation" or clock() > deadline:
                raise RawvmError(
                    f"cannot delete security group {group_id} of cluster {cluster}: {code}; "
                    f"run 'rawvm down {cluster}' again later"
                ) from None
            sleep(poll)
