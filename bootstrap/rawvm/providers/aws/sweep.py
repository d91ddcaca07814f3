"""``rawvm sweep`` on EC2: find what rawvm made that should be gone, say what it costs, and delete it.

Only resources rawvm tagged are ever looked at (a ``rawvm:cluster`` or ``rawvm:caller`` tag, checked again in
code after EC2's tag filter), and of those only:

- instances still alive past their ``rawvm:expires`` tag (every machine's backstop should have powered it off);
- launch templates of clusters with no live, unexpired instance, made more than ``GRACE_S`` ago (a launch in
  progress makes its template a moment before its fleet);
- security groups that no remaining rawvm launch template names, no live machine names in its ``rawvm:group``
  tag, and no live network interface uses (other than an expired instance's), made more than ``GRACE_S`` ago;
- EBS volumes and network interfaces left ``available`` (attached to nothing);
- staging objects under ``clusters/`` in rawvm's staging bucket (one that carries rawvm's lifecycle rule) older
  than the rule's ``EXPIRE_DAYS`` (S3 applies lifecycle rules lazily, up to a day or two late).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from rawvm.providers.aws import staging as aws_staging
from rawvm.providers.aws import teardown as aws_teardown
from rawvm.providers.aws.prices import HOURS_PER_MONTH, PriceBook

TAG_KEYS = ("rawvm:cluster", "rawvm:caller")  # every rawvm resource carries one of them
GRACE_S = 3600.0
DELETE_BATCH = 1000  # DeleteObjects takes up to 1000 keys per call
ORDER = ("instance", "launch-template", "network-interface", "security-group", "volume", "staging-object")


@dataclass(frozen=True)
class Leftover:
    kind: str  # one of ORDER
    id: str
    region: str
    cluster: str
    why: str
    monthly_usd: float | None  # None: unknown; 0.0: free


def tags_of(item: dict[str, Any]) -> dict[str, str]:
    return {str(t["Key"]): str(t["Value"]) for t in item.get("Tags", item.get("TagSet", [])) or []}


def is_rawvm(tags: dict[str, str]) -> bool:
    return any(key in tags for key in TAG_KEYS)


def parse_time(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError):
        return None


def _created(tags: dict[str, str], item: dict[str, Any], field: str = "CreateTime") -> float:
    """When a resource was made: its ``rawvm:created`` tag, else EC2's own time, else now (= too new to touch)."""
    stamp = parse_time(tags.get("rawvm:created", ""))
    if stamp is not None:
        return stamp
    made = item.get(field)
    return made.timestamp() if isinstance(made, datetime) else time.time()


def _when(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _pages(ec2: Any, operation: str, key: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
    for page in ec2.get_paginator(operation).paginate(**kwargs):
        yield from page.get(key, [])


@dataclass
class _Ec2View:
    """What the sweep reads from one region, once."""

    instances: list[dict[str, Any]]
    templates: list[dict[str, Any]]
    groups: list[dict[str, Any]]
    volumes: list[dict[str, Any]]
    interfaces: list[dict[str, Any]]


def _tagged(ec2: Any, operation: str, key: str, id_field: str, *filters: dict[str, Any]) -> list[dict[str, Any]]:
    """Everything ``operation`` lists that carries any of rawvm's tag keys, each once. One request per key:
    a ``tag-key`` filter with several values is an OR in EC2, but not in every mock of it."""
    found: dict[str, dict[str, Any]] = {}
    for tag_key in TAG_KEYS:
        for item in _pages(ec2, operation, key, Filters=[{"Name": "tag-key", "Values": [tag_key]}, *filters]):
            found.setdefault(str(item[id_field]), item)
    return list(found.values())


def _read(ec2: Any) -> _Ec2View:
    live = {"Name": "instance-state-name", "Values": list(aws_teardown.LIVE_STATES)}
    available = {"Name": "status", "Values": ["available"]}
    instances: dict[str, dict[str, Any]] = {}
    for tag_key in TAG_KEYS:
        filters = [{"Name": "tag-key", "Values": [tag_key]}, live]
        for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
            for reservation in page.get("Reservations", []):
                for instance in reservation.get("Instances", []):
                    instances.setdefault(str(instance["InstanceId"]), instance)
    return _Ec2View(
        instances=list(instances.values()),
        templates=_tagged(ec2, "describe_launch_templates", "LaunchTemplates", "LaunchTemplateId"),
        groups=_tagged(ec2, "describe_security_groups", "SecurityGroups", "GroupId"),
        volumes=_tagged(ec2, "describe_volumes", "Volumes", "VolumeId", available),
        interfaces=_tagged(ec2, "describe_network_interfaces", "NetworkInterfaces", "NetworkInterfaceId", available),
    )


def _group_users(ec2: Any, group_id: str) -> list[dict[str, Any]]:
    """Every network interface (rawvm's or not) that uses the group: a group in use is never a leftover."""
    return list(
        _pages(
            ec2,
            "describe_network_interfaces",
            "NetworkInterfaces",
            Filters=[{"Name": "group-id", "Values": [group_id]}],
        )
    )


def find_ec2(ec2: Any, region: str, prices: PriceBook, now: float) -> list[Leftover]:
    view = _read(ec2)
    found: list[Leftover] = []
    expired: set[str] = set()
    live_clusters: set[str] = set()
    live_groups: set[str] = set()  # the caller groups live machines' launches used (their templates are gone)
    for instance in view.instances:
        tags = tags_of(instance)
        if not is_rawvm(tags):
            continue
        expires = parse_time(tags.get("rawvm:expires", ""))
        if expires is None or expires > now:
            live_clusters.add(tags.get("rawvm:cluster", ""))
            live_groups.add(tags.get(aws_teardown.GROUP_TAG, ""))
            continue
        expired.add(instance["InstanceId"])
        spot = instance.get("InstanceLifecycle") == "spot"
        zone = str(instance.get("Placement", {}).get("AvailabilityZone", ""))
        hour = prices.machine_hour(region, str(instance.get("InstanceType", "")), spot=spot, zone=zone)
        found.append(
            Leftover(
                "instance",
                instance["InstanceId"],
                region,
                tags.get("rawvm:cluster", ""),
                f"{instance.get('InstanceType', '?')} {instance['State']['Name']} past rawvm:expires {_when(expires)}",
                None if hour is None else hour * HOURS_PER_MONTH,
            )
        )
    kept_templates: list[dict[str, Any]] = []
    for template in view.templates:
        tags = tags_of(template)
        if not is_rawvm(tags):
            continue
        cluster = tags.get("rawvm:cluster", "")
        if cluster in live_clusters or now - _created(tags, template) < GRACE_S:
            kept_templates.append(template)
            continue
        found.append(
            Leftover(
                "launch-template",
                template["LaunchTemplateId"],
                region,
                cluster,
                f"{template.get('LaunchTemplateName', '')}: no live machine of cluster {cluster or '?'}",
                0.0,
            )
        )
    swept = {
        eni["NetworkInterfaceId"]
        for eni in view.interfaces
        if is_rawvm(tags_of(eni)) and eni.get("Status") == "available"
    }
    named = live_groups | {g for t in kept_templates for g in aws_teardown.template_groups(ec2, t["LaunchTemplateId"])}
    for eni in view.interfaces:
        tags = tags_of(eni)
        if not is_rawvm(tags) or eni.get("Status") != "available":
            continue
        found.append(
            Leftover(
                "network-interface",
                eni["NetworkInterfaceId"],
                region,
                tags.get("rawvm:cluster", ""),
                "available (attached to nothing)",
                0.0,
            )
        )
    for group in view.groups:
        tags = tags_of(group)
        group_id = group["GroupId"]
        if not is_rawvm(tags) or group.get("GroupName") == "default" or group_id in named:
            continue
        if now - _created(tags, group) < GRACE_S:
            continue
        users = [
            eni
            for eni in _group_users(ec2, group_id)
            if eni.get("Attachment", {}).get("InstanceId") not in expired and eni["NetworkInterfaceId"] not in swept
        ]
        if users:
            continue
        found.append(
            Leftover(
                "security-group",
                group_id,
                region,
                tags.get("rawvm:cluster", ""),
                f"{group.get('GroupName', '')}: no live cluster uses it",
                0.0,
            )
        )
    for volume in view.volumes:
        tags = tags_of(volume)
        if not is_rawvm(tags) or volume.get("State") != "available":
            continue
        kind, size = str(volume.get("VolumeType", "gp3")), int(volume.get("Size", 0))
        per_gb = prices.volume_gb_month(region, kind)
        found.append(
            Leftover(
                "volume",
                volume["VolumeId"],
                region,
                tags.get("rawvm:cluster", ""),
                f"{size} GiB {kind} available (attached to nothing)",
                None if per_gb is None else per_gb * size,
            )
        )
    return found


def is_staging_bucket(s3: Any, bucket: str) -> bool:
    """rawvm's own bucket: it exists here and carries rawvm's lifecycle rule (``rawvm setup aws`` puts it)."""
    try:
        rules = s3.get_bucket_lifecycle_configuration(Bucket=bucket).get("Rules", [])
    except (ClientError, BotoCoreError):
        return False
    return any(rule.get("ID") == aws_staging.LIFECYCLE_RULE_ID for rule in rules)


def find_staging(s3: Any, bucket: str, region: str, prices: PriceBook, now: float) -> list[Leftover]:
    if not is_staging_bucket(s3, bucket):
        return []
    limit = aws_staging.EXPIRE_DAYS * 86400.0
    found = []
    per_gb: float | None = None
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="clusters/"):
        for item in page.get("Contents", []):
            modified = item.get("LastModified")
            if not isinstance(modified, datetime) or now - modified.timestamp() < limit:
                continue
            per_gb = per_gb if per_gb is not None else prices.s3_gb_month(region)
            size = int(item.get("Size", 0))
            key = str(item["Key"])
            found.append(
                Leftover(
                    "staging-object",
                    f"s3://{bucket}/{key}",
                    region,
                    key.split("/")[1] if key.count("/") >= 2 else "",
                    f"{size} bytes, staged {_when(modified.timestamp())}, past {aws_staging.EXPIRE_DAYS} days",
                    None if per_gb is None else per_gb * size / 2**30,
                )
            )
    return found


def sort_key(leftover: Leftover) -> tuple[int, str, str]:
    return ORDER.index(leftover.kind), leftover.region, leftover.id


def delete(
    ec2: Any,
    s3: Any | None,
    leftovers: Iterable[Leftover],
    *,
    timeout: float = 900.0,
    poll: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> list[str]:
    """Delete the leftovers of one region, instances first (their groups can go only once they have); returns
    one line per failure."""
    by_kind: dict[str, list[Leftover]] = {}
    for leftover in leftovers:
        by_kind.setdefault(leftover.kind, []).append(leftover)
    errors: list[str] = []
    deadline = clock() + timeout

    def attempt(what: Leftover, call: Callable[[], object], ok_codes: tuple[str, ...] = ()) -> None:
        try:
            call()
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code not in ok_codes:
                errors.append(f"{what.kind} {what.id}: {code or exc}")

    instance_ids = [x.id for x in by_kind.get("instance", [])]
    if instance_ids:
        aws_teardown.terminate(ec2, instance_ids)
        while True:
            alive = [
                i["InstanceId"]
                for i in aws_teardown.described(ec2, instance_ids)
                if i["State"]["Name"] in aws_teardown.LIVE_STATES and i["State"]["Name"] != "shutting-down"
            ]
            if not alive or clock() > deadline:
                errors.extend(f"instance {i}: still not terminated after {timeout:.0f}s" for i in alive)
                break
            sleep(poll)
    for template in by_kind.get("launch-template", []):
        attempt(
            template,
            partial(ec2.delete_launch_template, LaunchTemplateId=template.id),
            ("InvalidLaunchTemplateId.NotFound",),
        )
    for eni in by_kind.get("network-interface", []):
        attempt(
            eni,
            partial(ec2.delete_network_interface, NetworkInterfaceId=eni.id),
            ("InvalidNetworkInterfaceID.NotFound",),
        )
    for group in by_kind.get("security-group", []):
        while True:
            try:
                ec2.delete_security_group(GroupId=group.id)
                break
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code == "InvalidGroup.NotFound":
                    break
                # Interfaces of just-terminated instances linger for a little while.
                if code != "DependencyViolation" or clock() > deadline:
                    errors.append(f"security-group {group.id}: {code}")
                    break
                sleep(poll)
    for volume in by_kind.get("volume", []):
        attempt(volume, partial(ec2.delete_volume, VolumeId=volume.id), ("InvalidVolume.NotFound",))
    objects: dict[str, list[str]] = {}
    for obj in by_kind.get("staging-object", []):
        bucket, _, key = obj.id.removeprefix("s3://").partition("/")
        objects.setdefault(bucket, []).append(key)
    for bucket, keys in objects.items():
        if s3 is None:
            errors.extend(f"staging-object s3://{bucket}/{k}: no S3 client" for k in keys)
            continue
        for start in range(0, len(keys), DELETE_BATCH):
            batch = [{"Key": k} for k in keys[start : start + DELETE_BATCH]]
            answer = s3.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
            errors.extend(
                f"staging-object s3://{bucket}/{e.get('Key')}: {e.get('Code')}" for e in answer.get("Errors", [])
            )
    return errors
