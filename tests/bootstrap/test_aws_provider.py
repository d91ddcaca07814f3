"""The aws provider against moto in server mode (see test_aws_moto.py for what moto is and what is injected).

moto applies a launch template's tags to the instances and volumes a fleet starts, but not its IMDS options,
shutdown behaviour or block devices; those are read back from DescribeLaunchTemplateVersions, which is what
EC2 applies to every instance of the fleet.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from botocore.awsrequest import AWSResponse, HTTPHeaders
from rawvm.agent.tls import make_channel
from rawvm.agent.userdata import AGENT_TOML, USER_DATA_LIMIT
from rawvm.errors import RawvmError, UsageError
from rawvm.options import MachineRequest
from rawvm.providers.aws.instances import machine_of
from rawvm.providers.aws.provider import AwsProvider
from rawvm.providers.base import MachineSpec
from rawvm_agent import DEFAULT_PORT
from rawvm_agent.config import AgentConfig, IdleConfig

from tests.bootstrap.test_aws_moto import (
    CALLER_IP,
    REGION,
    SENT_TEMPLATES,
    MotoServer,
    fake_wheel,
    iter_tags,
    moto_provider,
    record_calls,
    seed_public_image_parameters,
)
from tests.systools import need_tool

TOKEN = "secret-token-0123456789"
TAG_KEYS = {"rawvm:cluster", "rawvm:owner", "rawvm:created", "rawvm:expires"}

pytestmark = pytest.mark.slow  # moto answers DescribeInstances over 1000 machines in seconds, not milliseconds


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


def make_provider(server: MotoServer, tmp: Path) -> AwsProvider:
    return moto_provider(server, tmp, "rawvm-test-staging", poll=0.01, sleep=lambda s: None)


def make_spec(tmp: Path, cluster: str, count: int, **kw: Any) -> MachineSpec:
    """A spec as a launch makes it, but with the token itself in its agent config: the user-data must still hold
    only its sha256."""
    agent = AgentConfig(token=TOKEN, idle=IdleConfig(max_lifetime=3600.0))
    channel = make_channel(cluster, tmp / "tls" / cluster, 3600)[1]
    request = MachineRequest(provider="aws", n=count, **kw)
    return MachineSpec(cluster, request, agent, fake_wheel(tmp), owner="tester", channel=channel)


class SpotShortage:
    """EC2 has spot capacity for only ``available`` machines.

    At the HTTP boundary: a ``before-call`` hook lowers the spot fleet's target in the request moto receives
    to ``available`` (so moto really starts that many spot instances), and an ``after-call`` hook adds to
    the parsed answer the ``InsufficientInstanceCapacity`` errors AWS reports for the unfilled pools, in
    AWS's own response shape. On-demand requests pass untouched.
    """

    def __init__(self, client: Any, available: int) -> None:
        self.available = available
        self.spot_overrides: list[tuple[str, str]] = []
        client.meta.events.register("before-call.ec2.CreateFleet", self.before)
        client.meta.events.register("after-call.ec2.CreateFleet", self.after)

    def before(self, params: dict[str, Any], context: dict[str, Any], **kwargs: Any) -> None:
        body = params["body"]
        if body.get("TargetCapacitySpecification.DefaultTargetCapacityType") == "spot":
            context["short_overrides"] = [
                (body[f"LaunchTemplateConfigs.1.Overrides.{i}.InstanceType"], body[key])
                for i in range(1, 1000)
                if (key := f"LaunchTemplateConfigs.1.Overrides.{i}.SubnetId") in body
            ]
            body["TargetCapacitySpecification.TotalTargetCapacity"] = str(self.available)
            self.spot_overrides = context["short_overrides"]

    def after(self, parsed: dict[str, Any], context: dict[str, Any], **kwargs: Any) -> None:
        for instance_type, subnet in context.get("short_overrides", []):
            parsed.setdefault("Errors", []).append(
                {
                    "LaunchTemplateAndOverrides": {"Overrides": {"InstanceType": instance_type, "SubnetId": subnet}},
                    "Lifecycle": "spot",
                    "ErrorCode": "InsufficientInstanceCapacity",
                    "ErrorMessage": "There is no Spot capacity available that matches your request.",
                }
            )


@pytest.fixture(scope="module")
def big_launch(moto: MotoServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """1000 machines, spot_with_fallback, with spot capacity for 400 of them, launched as a new cluster from an
    address that launched one small cluster before (which paid for the caller's security group)."""
    moto.reset()
    tmp = tmp_path_factory.mktemp("big")
    provider = make_provider(moto, tmp)
    ec2 = provider.client("ec2", REGION)
    log = record_calls(ec2)
    provider.launch(make_spec(tmp, "first", 1, cpu=2))
    first_calls = list(log.calls)
    log.calls.clear()
    shortage = SpotShortage(ec2, available=400)
    machines = provider.launch(make_spec(tmp, "big", 1000, cpu=2, spot_policy="spot_with_fallback"))
    calls = list(log.calls)
    pages = ec2.get_paginator("describe_instances").paginate(Filters=[{"Name": "tag:rawvm:cluster", "Values": ["big"]}])
    instances = [i for p in pages for r in p["Reservations"] for i in r["Instances"]]
    return {
        "provider": provider,
        "ec2": ec2,
        "machines": machines,
        "calls": calls,
        "first_calls": first_calls,
        "instances": instances,
        "spot_overrides": shortage.spot_overrides,
    }


def mutating_calls(calls: list[str]) -> list[str]:
    return [c for c in calls if not c.startswith(("Describe", "Get"))]


def test_1000_machines_spot_with_fallback_take_at_most_3_mutating_calls(big_launch: dict[str, Any]) -> None:
    # The launch template, one spot fleet, one on-demand fleet for the shortfall, and the template deleted once they
    # answered (its user-data holds the agents' TLS key). No per-machine call.
    assert mutating_calls(big_launch["calls"]) == [
        "CreateLaunchTemplate",
        "CreateFleet",
        "CreateFleet",
        "DeleteLaunchTemplate",
    ]
    # The first launch from an address also makes the caller's security group (EC2 needs two calls for a
    # group and its rule); every later cluster from that address reuses it.
    assert mutating_calls(big_launch["first_calls"]) == [
        "CreateSecurityGroup",
        "AuthorizeSecurityGroupIngress",
        "CreateLaunchTemplate",
        "CreateFleet",
        "DeleteLaunchTemplate",
    ]
    assert Counter(m.spot for m in big_launch["machines"]) == {True: 400, False: 600}
    assert len({m.id for m in big_launch["machines"]}) == 1000


def test_one_fleet_spans_the_cheapest_types_across_every_zone(big_launch: dict[str, Any]) -> None:
    """EC2 moves to the next zone or type inside the one CreateFleet call, so the overrides must offer them."""
    overrides = big_launch["spot_overrides"]
    subnets = big_launch["ec2"].describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"]
    types = list(dict.fromkeys(t for t, _ in overrides))
    assert len(types) == 3
    assert sorted(overrides) == sorted((t, s["SubnetId"]) for t in types for s in subnets)


def test_the_spot_shortfall_is_filled_on_demand(big_launch: dict[str, Any]) -> None:
    live = [i for i in big_launch["instances"] if i["State"]["Name"] in ("pending", "running")]
    lifecycles = Counter(i.get("InstanceLifecycle", "on-demand") for i in live)
    assert lifecycles == {"spot": 400, "on-demand": 600}


def test_every_instance_and_volume_carries_the_tags(big_launch: dict[str, Any]) -> None:
    ec2 = big_launch["ec2"]
    instances = big_launch["instances"]
    assert len(instances) == 1000
    for instance in instances:
        tags = dict(iter_tags(instance.get("Tags")))
        assert tags.keys() >= TAG_KEYS, instance["InstanceId"]
        assert tags["rawvm:cluster"] == "big" and tags["rawvm:owner"] == "tester"
        assert tags["rawvm:expires"] > tags["rawvm:created"]
    volume_ids = {m["Ebs"]["VolumeId"] for i in instances for m in i.get("BlockDeviceMappings", [])}
    volumes = [v for p in ec2.get_paginator("describe_volumes").paginate() for v in p["Volumes"]]
    ours = [v for v in volumes if v["VolumeId"] in volume_ids]
    assert len(ours) == 1000
    assert all(dict(iter_tags(v.get("Tags"))).keys() >= TAG_KEYS for v in ours)


def template_data(ec2: Any, cluster: str) -> dict[str, Any]:
    """The launch template data the cluster's last launch sent (the launch deleted the template right after its
    fleets: EC2 has nothing left to describe)."""
    template = ec2.describe_launch_templates(Filters=[{"Name": "tag:rawvm:cluster", "Values": [cluster]}])
    assert template["LaunchTemplates"] == []
    data = SENT_TEMPLATES[cluster]
    assert dict(iter_tags(data["TemplateTags"])).keys() >= TAG_KEYS
    return data


def test_launch_template_has_imdsv2_terminate_and_an_encrypted_root_deleted_on_termination(
    big_launch: dict[str, Any],
) -> None:
    data = template_data(big_launch["ec2"], "big")
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    assert int(data["MetadataOptions"]["HttpPutResponseHopLimit"]) == 1
    assert data["InstanceInitiatedShutdownBehavior"] == "terminate"
    (root,) = data["BlockDeviceMappings"]
    assert root["Ebs"]["Encrypted"] in (True, "true")
    assert root["Ebs"]["DeleteOnTermination"] in (True, "true")
    assert root["Ebs"]["VolumeType"] == "gp3"
    assert "KeyName" not in data  # no SSH unless asked
    for spec in data["TagSpecifications"]:
        assert dict(iter_tags(spec["Tags"])).keys() >= TAG_KEYS
    assert {s["ResourceType"] for s in data["TagSpecifications"]} >= {"instance", "volume"}


def test_user_data_is_valid_cloud_config_under_16_kb(big_launch: dict[str, Any], tmp_path: Path) -> None:
    data = template_data(big_launch["ec2"], "big")
    raw = base64.b64decode(data["UserData"])
    assert len(raw) <= USER_DATA_LIMIT
    text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode()
    path = tmp_path / "user-data"
    path.write_text(text)
    cloud_init = need_tool("cloud-init", "cloud-init")
    result = subprocess.run([cloud_init, "schema", "--config-file", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    files = {f["path"]: f["content"] for f in yaml.safe_load(text)["write_files"]}
    agent_toml = files[AGENT_TOML]
    assert 'bind = "0.0.0.0"' in agent_toml and "enabled = true" in agent_toml  # spot watcher on
    assert TOKEN not in text  # not even inside agent.toml: only its sha256
    assert f'token_sha256 = "{hashlib.sha256(TOKEN.encode()).hexdigest()}"' in agent_toml
    assert 'tls_ca = "/etc/rawvm/tls/ca.crt"' in agent_toml


def test_security_group_opens_only_the_agent_port_to_the_caller(big_launch: dict[str, Any]) -> None:
    ec2 = big_launch["ec2"]
    (group_id,) = template_data(ec2, "big")["SecurityGroupIds"]
    (group,) = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"]
    assert group_id in template_data(ec2, "first")["SecurityGroupIds"]  # shared by the caller's clusters
    rules = group["IpPermissions"]
    assert [(r["IpProtocol"], r["FromPort"], r["ToPort"]) for r in rules] == [("tcp", DEFAULT_PORT, DEFAULT_PORT)]
    assert [ip["CidrIp"] for ip in rules[0]["IpRanges"]] == [f"{CALLER_IP}/32"]
    tags = dict(iter_tags(group.get("Tags")))
    assert tags["rawvm:owner"] == "tester" and tags["rawvm:caller"] == f"{CALLER_IP}/32"
    assert "rawvm:cluster" not in tags  # it outlives any one cluster; 'down' deletes it once unused


def test_launch_returns_the_machines_with_their_agent_urls(big_launch: dict[str, Any]) -> None:
    machines = big_launch["machines"]
    by_id = {i["InstanceId"]: i for i in big_launch["instances"]}
    assert {m.id for m in machines} == set(by_id)
    for m in machines:
        instance = by_id[m.id]
        address = instance.get("PublicIpAddress") or instance["PrivateIpAddress"]
        assert m.agent_url == f"https://{address}:{DEFAULT_PORT}"
        assert m.provider == "aws" and m.cluster == "big" and m.zone == instance["Placement"]["AvailabilityZone"]
        assert m.spot == (instance.get("InstanceLifecycle") == "spot")


def test_agent_address_rule() -> None:
    """Public address first; a running machine without one is reached privately; a pending one not yet; always
    over mutual TLS."""
    base = {"InstanceId": "i-1", "Tags": [{"Key": "rawvm:port", "Value": "9000"}]}
    public = {**base, "State": {"Name": "running"}, "PublicIpAddress": "3.3.3.3", "PrivateIpAddress": "10.0.0.5"}
    assert machine_of(public).agent_url == "https://3.3.3.3:9000"
    private = {**base, "State": {"Name": "running"}, "PrivateIpAddress": "10.0.0.5"}
    assert machine_of(private).agent_url == "https://10.0.0.5:9000"
    pending = {**base, "State": {"Name": "pending"}, "PrivateIpAddress": "10.0.0.5"}
    assert machine_of(pending).agent_url == ""


def xml_response(request: Any, status: int, body: bytes) -> AWSResponse:
    """An HTTP answer as EC2 would send it, handed to botocore's parser in place of the network's."""

    class Raw:
        def stream(self, **kwargs: Any) -> Iterator[bytes]:
            yield body

    headers = HTTPHeaders()
    headers["Content-Type"] = "text/xml"
    return AWSResponse(request.url, status, headers, Raw())


def throttle_response(request: Any) -> AWSResponse:
    body = (
        b"<?xml version='1.0' encoding='UTF-8'?><Response><Errors><Error><Code>RequestLimitExceeded</Code>"
        b"<Message>Request limit exceeded.</Message></Error></Errors><RequestID>rid</RequestID></Response>"
    )
    return xml_response(request, 503, body)


def test_request_limit_exceeded_is_retried_with_backoff(moto: MotoServer, tmp_path: Path) -> None:
    """The first two CreateFleet attempts are answered with EC2's throttling error (injected before the
    request leaves botocore); botocore's standard retry mode retries and the third reaches moto."""
    moto.reset()
    provider = make_provider(moto, tmp_path)
    ec2 = provider.client("ec2", REGION)
    attempts: list[str] = []

    def throttle(request: Any, **kwargs: Any) -> AWSResponse | None:
        attempts.append("CreateFleet")
        return throttle_response(request) if len(attempts) <= 2 else None

    ec2.meta.events.register("before-send.ec2.CreateFleet", throttle)
    log = record_calls(ec2)
    machines = provider.launch(make_spec(tmp_path, "throttled", 3, cpu=2))
    assert len(machines) == 3
    assert len(attempts) == 3  # two throttled, one through
    assert log.calls.count("CreateFleet") == 1  # one API call, retried inside botocore


def _capacity_error_response(request: Any) -> AWSResponse:
    """An instant fleet that started nothing: AWS answers 200 with an errorSet."""
    body = (
        b'<?xml version="1.0" encoding="UTF-8"?>'
        b'<CreateFleetResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>r</requestId>'
        b"<fleetId>fleet-0123</fleetId><errorSet><item><launchTemplateAndOverrides><overrides>"
        b"<instanceType>c7i.large</instanceType><availabilityZone>us-east-1a</availabilityZone></overrides>"
        b"</launchTemplateAndOverrides><lifecycle>on-demand</lifecycle>"
        b"<errorCode>InsufficientInstanceCapacity</errorCode><errorMessage>no capacity</errorMessage></item>"
        b"</errorSet><fleetInstanceSet/></CreateFleetResponse>"
    )
    return xml_response(request, 200, body)


def test_no_capacity_anywhere_is_one_clear_error_listing_what_was_tried(moto: MotoServer, tmp_path: Path) -> None:
    moto.reset()
    provider = make_provider(moto, tmp_path)
    ec2 = provider.client("ec2", REGION)
    ec2.meta.events.register("before-send.ec2.CreateFleet", lambda request, **kw: _capacity_error_response(request))
    with pytest.raises(RawvmError) as info:
        provider.launch(make_spec(tmp_path, "nocap", 2, vm_type="c7i.large"))
    message = str(info.value)
    assert "started 0 of 2" in message
    assert "c7i.large in us-east-1a (on-demand): InsufficientInstanceCapacity" in message
    assert "\n" not in message


def test_down_leaves_nothing_tagged(moto: MotoServer, tmp_path: Path) -> None:
    moto.reset()
    provider = make_provider(moto, tmp_path)
    provider.launch(make_spec(tmp_path, "gone", 5, cpu=2, spot_policy="spot"))
    provider.launch(make_spec(tmp_path, "stays", 2, cpu=2))
    assert provider.down("gone") == 5
    ec2 = provider.client("ec2", REGION)
    by_tag = [{"Name": "tag:rawvm:cluster", "Values": ["gone"]}]
    live = ["pending", "running", "stopping", "stopped", "shutting-down"]
    reservations = ec2.describe_instances(Filters=[*by_tag, {"Name": "instance-state-name", "Values": live}])
    assert reservations["Reservations"] == []
    assert ec2.describe_security_groups(Filters=by_tag)["SecurityGroups"] == []
    assert ec2.describe_launch_templates(Filters=by_tag)["LaunchTemplates"] == []
    stays = provider.list("stays")  # another cluster is untouched
    assert len(stays) == 2 and all(m.state == "running" and m.cluster == "stays" for m in stays)
    described = ec2.describe_instances(InstanceIds=[m.id for m in stays])["Reservations"]
    addresses = {
        i["InstanceId"]: i.get("PublicIpAddress") or i["PrivateIpAddress"] for r in described for i in r["Instances"]
    }
    assert all(m.agent_url == f"https://{addresses[m.id]}:{DEFAULT_PORT}" for m in stays)
    assert provider.down("gone") == 0  # idempotent
    # "gone" and "stays" came from one address and share its security group: it stays while "stays" runs.
    (group_id,) = template_data(ec2, "stays")["SecurityGroupIds"]
    assert ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"]
    assert provider.down("stays") == 2
    by_owner = [{"Name": "tag:rawvm:owner", "Values": ["tester"]}]
    live_filter = [*by_owner, {"Name": "instance-state-name", "Values": live}]
    assert ec2.describe_instances(Filters=live_filter)["Reservations"] == []
    assert ec2.describe_security_groups(Filters=by_owner)["SecurityGroups"] == []
    assert ec2.describe_launch_templates(Filters=by_owner)["LaunchTemplates"] == []


def test_second_launch_in_a_cluster_reuses_its_group_and_template(moto: MotoServer, tmp_path: Path) -> None:
    moto.reset()
    provider = make_provider(moto, tmp_path)
    provider.launch(make_spec(tmp_path, "again", 1, cpu=2))
    log = record_calls(provider.client("ec2", REGION))
    provider.launch(make_spec(tmp_path, "again", 1, cpu=2))
    # Same caller address: the group already lets it in; a fresh template (the last launch deleted its own).
    assert log.mutating == ["CreateLaunchTemplate", "CreateFleet", "DeleteLaunchTemplate"]
    assert len(provider.list("again")) == 2
    provider.caller_ip = lambda: "198.51.100.9"  # the laptop moved: the new /32 replaces the old one
    log.calls.clear()
    provider.launch(make_spec(tmp_path, "again", 1, cpu=2))
    assert log.mutating == [
        "CreateSecurityGroup",
        "AuthorizeSecurityGroupIngress",
        "CreateLaunchTemplate",
        "CreateFleet",
        "DeleteLaunchTemplate",
    ]
    ec2 = provider.client("ec2", REGION)
    (group_id,) = template_data(ec2, "again")["SecurityGroupIds"]
    (group,) = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"]
    assert [ip["CidrIp"] for r in group["IpPermissions"] for ip in r["IpRanges"]] == ["198.51.100.9/32"]
    assert provider.down("again") == 3
    by_owner = [{"Name": "tag:rawvm:owner", "Values": ["tester"]}]
    assert ec2.describe_security_groups(Filters=by_owner)["SecurityGroups"] == []  # both addresses' groups


def test_unknown_instance_type_or_region_is_one_clear_line(moto: MotoServer, tmp_path: Path) -> None:
    moto.reset()
    provider = make_provider(moto, tmp_path)
    with pytest.raises(UsageError, match=r"unknown instance type 'c99.huge' in us-east-1"):
        provider.launch(make_spec(tmp_path, "bad", 1, vm_type="c99.huge"))
    with pytest.raises(UsageError, match=r"unknown AWS region 'mars-north-1'"):
        provider.launch(make_spec(tmp_path, "bad", 1, region="mars-north-1"))
    with pytest.raises(UsageError, match=r"unknown AWS region 'mars-north-1'"):
        provider.target_platform(make_spec(tmp_path, "bad", 1, region="mars-north-1"))
    with pytest.raises(UsageError, match=r"unknown instance type 'c99.huge'"):
        provider.target_platform(make_spec(tmp_path, "bad", 1, vm_type="c99.huge"))
    with pytest.raises(UsageError, match="unknown spot policy"):
        provider.launch(make_spec(tmp_path, "bad", 1, spot_policy="cheap"))
    with pytest.raises(UsageError, match="no current EC2 instance type has"):
        provider.launch(make_spec(tmp_path, "bad", 1, cpu=100000))
    log = record_calls(provider.client("ec2", REGION))
    with pytest.raises(UsageError):
        provider.launch(make_spec(tmp_path, "bad", 1, vm_type="c99.huge"))
    assert log.mutating == []  # nothing was made for a bad request


def test_ssh_opens_port_22_to_the_caller_only_when_asked(moto: MotoServer, tmp_path: Path) -> None:
    moto.reset()
    provider = make_provider(moto, tmp_path)
    provider.ssh_key_name = "my-key"
    provider.launch(make_spec(tmp_path, "ssh", 1, cpu=2))
    ec2 = provider.client("ec2", REGION)
    (group_id,) = template_data(ec2, "ssh")["SecurityGroupIds"]
    (group,) = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"]
    assert sorted(r["FromPort"] for r in group["IpPermissions"]) == [22, DEFAULT_PORT]
    assert all(ip["CidrIp"] == f"{CALLER_IP}/32" for r in group["IpPermissions"] for ip in r["IpRanges"])
    assert template_data(ec2, "ssh")["KeyName"] == "my-key"


def test_spot_only_shortfall_releases_what_started_and_says_what_was_tried(moto: MotoServer, tmp_path: Path) -> None:
    moto.reset()
    provider = make_provider(moto, tmp_path)
    ec2 = provider.client("ec2", REGION)
    SpotShortage(ec2, available=2)
    with pytest.raises(RawvmError) as info:
        provider.launch(make_spec(tmp_path, "short", 5, cpu=2, spot_policy="spot"))
    message = str(info.value)
    assert "started 2 of 5" in message and "(spot): InsufficientInstanceCapacity" in message
    assert "spot_with_fallback" in message
    assert provider.list("short") == []  # nothing left running (or billing)


def test_gpu_and_arm_launches_boot_the_matching_public_images(moto: MotoServer, tmp_path: Path) -> None:
    from rawvm_images.ec2 import GPU_PARAMETERS, UBUNTU_PARAMETERS

    moto.reset()
    provider = make_provider(moto, tmp_path)
    seeded = seed_public_image_parameters(provider.client("ec2", REGION))
    ec2 = provider.client("ec2", REGION)
    gpu = make_spec(tmp_path, "gpu", 1, gpu=True)
    (machine,) = provider.launch(gpu)
    assert template_data(ec2, "gpu")["ImageId"] == seeded[GPU_PARAMETERS["x86_64"]]
    assert provider.instance_types(REGION) and machine.instance_type in {
        t.name for t in provider.instance_types(REGION) if t.gpus
    }
    arm = make_spec(tmp_path, "arm", 1, arm=True)
    assert provider.target_platform(arm) == "linux-aarch64"
    provider.launch(arm)
    assert template_data(ec2, "arm")["ImageId"] == seeded[UBUNTU_PARAMETERS["aarch64"]]
    # An explicit Graviton type means aarch64 even without --arm.
    assert provider.target_platform(make_spec(tmp_path, "x", 1, vm_type="c7g.large")) == "linux-aarch64"
    assert provider.target_platform(make_spec(tmp_path, "x", 1, vm_type="c7i.large")) == "linux-x86_64"


def test_down_waits_out_a_security_group_still_in_use(moto: MotoServer, tmp_path: Path) -> None:
    """EC2 refuses to delete a group while the terminated instances' interfaces linger (DependencyViolation);
    the first delete is answered that way, and down tries again after a pause."""
    moto.reset()
    provider = make_provider(moto, tmp_path)
    provider.launch(make_spec(tmp_path, "busy", 2, cpu=2))
    pauses: list[float] = []
    provider.sleep = pauses.append
    ec2 = provider.client("ec2", REGION)
    answered: list[int] = []
    body = (
        b"<?xml version='1.0' encoding='UTF-8'?><Response><Errors><Error><Code>DependencyViolation</Code>"
        b"<Message>resource has a dependent object</Message></Error></Errors><RequestID>r</RequestID></Response>"
    )

    def in_use(request: Any, **kwargs: Any) -> AWSResponse | None:
        answered.append(1)
        return xml_response(request, 400, body) if len(answered) == 1 else None

    ec2.meta.events.register("before-send.ec2.DeleteSecurityGroup", in_use)
    assert provider.down("busy") == 2
    assert len(answered) == 2 and pauses
    assert (
        ec2.describe_security_groups(Filters=[{"Name": "tag:rawvm:cluster", "Values": ["busy"]}])["SecurityGroups"]
        == []
    )


def test_a_failing_fallback_fleet_releases_the_spot_machines(moto: MotoServer, tmp_path: Path) -> None:
    """Spot fills 3 of 5; the on-demand fleet for the rest fails with an EC2 error (injected): nothing of
    the half launch is left running, and the error is one line."""
    moto.reset()
    provider = make_provider(moto, tmp_path)
    ec2 = provider.client("ec2", REGION)
    SpotShortage(ec2, available=3)
    body = (
        b"<?xml version='1.0' encoding='UTF-8'?><Response><Errors><Error><Code>VcpuLimitExceeded</Code>"
        b"<Message>You have requested more vCPU capacity than your current limit</Message></Error></Errors>"
        b"<RequestID>r</RequestID></Response>"
    )

    def on_demand_refused(request: Any, **kwargs: Any) -> AWSResponse | None:
        sent = request.body if isinstance(request.body, bytes) else str(request.body).encode()
        wants_on_demand = b"DefaultTargetCapacityType=on-demand" in sent
        return xml_response(request, 400, body) if wants_on_demand else None

    ec2.meta.events.register("before-send.ec2.CreateFleet", on_demand_refused)
    with pytest.raises(RawvmError) as info:
        provider.launch(make_spec(tmp_path, "half", 5, cpu=2, spot_policy="spot_with_fallback"))
    assert "VcpuLimitExceeded" in str(info.value) and "\n" not in str(info.value)
    assert provider.list("half") == []
