"""``rawvm sweep`` against moto in server mode: it lists exactly the leftovers planted here, nothing untagged,
deletes them, and a second sweep finds none.

Planted: an instance past ``rawvm:expires``, a caller security group no template or instance uses, a launch
template of a cluster with no machine left, an ``available`` gp3 volume, an ``available`` network interface and a
staging object past its lifetime; beside them a live cluster launched by the provider (must stay) and untagged
look-alikes of each kind (named ``rawvm-...``, but with no rawvm tag: must never be touched). S3 cannot be told
an object's age over its API, so the staged object's LastModified is set in moto's in-process backend (the
server runs in this process), as test_aws_moto.py does for the SSM public parameters.

Prices: the c7i.large and gp3 prices are put in rawvm's price cache from Stubber-served Price List answers (see
test_costs.py); S3's is not, so the staged object's cost shows as unknown.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from moto.s3.models import s3_backends
from rawvm.cli import main

from tests.bootstrap.test_aws_moto import ACCOUNT, REGION, MotoServer, iter_tags
from tests.bootstrap.test_aws_provider import make_provider, make_spec
from tests.bootstrap.test_costs import C7I, GP3_ANSWER, seed_prices

pytestmark = pytest.mark.slow
BUCKET = "rawvm-test-staging"
NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def stamp(days: float) -> str:
    return (NOW + datetime.timedelta(days=days)).isoformat().replace("+00:00", "Z")


def tag_spec(kind: str, tags: dict[str, str]) -> list[dict[str, Any]]:
    return [{"ResourceType": kind, "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]


OLD = {"rawvm:owner": "tester", "rawvm:created": stamp(-3)}


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture
def planted(moto: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    moto.reset()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("RAWVM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps tables to the terminal's width
    seed_prices(tmp_path / "cache" / "prices", C7I, GP3_ANSWER)
    provider = make_provider(moto, tmp_path)
    ec2 = provider.client("ec2", REGION)
    s3 = provider.client("s3", REGION)
    live = provider.launch(make_spec(tmp_path, "alive", 1, vm_type="c7i.large"))
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    subnet = ec2.describe_subnets()["Subnets"][0]
    zone = subnet["AvailabilityZone"]

    def instance(tags: dict[str, str]) -> str:
        answer = ec2.run_instances(
            ImageId=image,
            InstanceType="c7i.large",
            MinCount=1,
            MaxCount=1,
            TagSpecifications=tag_spec("instance", tags),
        )
        return str(answer["Instances"][0]["InstanceId"])

    leftovers = {
        "instance": instance({"rawvm:cluster": "old", **OLD, "rawvm:expires": stamp(-2)}),
        "security-group": ec2.create_security_group(
            GroupName="rawvm-caller-198-51-100-1-8470",
            Description="rawvm: an address that launched nothing lately",
            TagSpecifications=tag_spec("security-group", {**OLD, "rawvm:caller": "198.51.100.1/32"}),
        )["GroupId"],
        "launch-template": ec2.create_launch_template(
            LaunchTemplateName="rawvm-gone",
            LaunchTemplateData={"ImageId": image},
            TagSpecifications=tag_spec("launch-template", {"rawvm:cluster": "gone", **OLD}),
        )["LaunchTemplate"]["LaunchTemplateId"],
        "volume": ec2.create_volume(
            AvailabilityZone=zone,
            Size=40,
            VolumeType="gp3",
            TagSpecifications=tag_spec("volume", {"rawvm:cluster": "gone", **OLD}),
        )["VolumeId"],
        "network-interface": ec2.create_network_interface(
            SubnetId=subnet["SubnetId"],
            TagSpecifications=tag_spec("network-interface", {"rawvm:cluster": "gone", **OLD}),
        )["NetworkInterface"]["NetworkInterfaceId"],
        "staging-object": f"s3://{BUCKET}/clusters/gone/files/pylock.toml",
    }
    s3.put_object(Bucket=BUCKET, Key="clusters/gone/files/pylock.toml", Body=b"x" * 2048)
    s3.put_object(Bucket=BUCKET, Key="clusters/alive/files/pylock.toml", Body=b"fresh")  # within its lifetime
    key = s3_backends[ACCOUNT]["aws"].buckets[BUCKET].keys["clusters/gone/files/pylock.toml"]
    key.last_modified = (NOW - datetime.timedelta(days=4)).replace(tzinfo=None)
    # Look-alikes without any rawvm tag: named like rawvm's, old, expired-looking. Never touched.
    lookalikes = {
        "instance": instance({"Name": "rawvm-old", "expires": stamp(-2)}),
        "security-group": ec2.create_security_group(
            GroupName="rawvm-caller-198-51-100-2-8470", Description="not rawvm's"
        )["GroupId"],
        "launch-template": ec2.create_launch_template(
            LaunchTemplateName="rawvm-lookalike", LaunchTemplateData={"ImageId": image}
        )["LaunchTemplate"]["LaunchTemplateId"],
        "volume": ec2.create_volume(AvailabilityZone=zone, Size=40, VolumeType="gp3")["VolumeId"],
        "network-interface": ec2.create_network_interface(SubnetId=subnet["SubnetId"])["NetworkInterface"][
            "NetworkInterfaceId"
        ],
    }
    return {"ec2": ec2, "tmp": tmp_path, "leftovers": leftovers, "lookalikes": lookalikes, "live": live}


def sweep(moto: MotoServer, tmp: Path, *flags: str) -> int:
    argv = ["sweep", "--region", REGION, "--bucket", BUCKET, "--endpoint-url", moto.url, "--config", str(tmp / "c")]
    return main([*argv, *flags])


def test_sweep_lists_exactly_the_planted_leftovers_deletes_them_and_finds_none_after(
    moto: MotoServer, planted: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    tmp, ec2 = planted["tmp"], planted["ec2"]
    assert sweep(moto, tmp, "--dry-run", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert {(x["kind"], x["id"]) for x in listed} == set(planted["leftovers"].items())
    cost = {x["kind"]: x["monthly_usd"] for x in listed}
    assert cost["instance"] == pytest.approx(0.08925 * 730)  # c7i.large on demand, 730 h a month
    assert cost["volume"] == pytest.approx(40 * 0.08)  # 40 GiB gp3
    assert cost["staging-object"] is None  # no S3 price cached, none asked for: unknown
    assert cost["security-group"] == cost["launch-template"] == cost["network-interface"] == 0.0

    assert sweep(moto, tmp, "--dry-run") == 0
    shown = capsys.readouterr()
    for leftover_id in planted["leftovers"].values():
        assert leftover_id in shown.out
    assert "$65.15" in shown.out and "$3.20" in shown.out and "unknown" in shown.out
    assert "6 leftovers: $68.35/month (+1 of unknown price)" in shown.out
    assert "nothing deleted" in shown.err
    for lookalike_id in planted["lookalikes"].values():
        assert lookalike_id not in shown.out

    assert sweep(moto, tmp) == 0  # lists the same table, then deletes
    done = capsys.readouterr()
    assert all(leftover_id in done.out for leftover_id in planted["leftovers"].values())
    assert "swept 6 of 6 leftovers" in done.err

    assert sweep(moto, tmp, "--dry-run", "--json") == 0
    assert json.loads(capsys.readouterr().out) == []
    assert sweep(moto, tmp) == 0
    assert "nothing to sweep in us-east-1" in capsys.readouterr().out

    gone, kept = planted["leftovers"], planted["lookalikes"]
    state = ec2.describe_instances(InstanceIds=[gone["instance"], kept["instance"]])["Reservations"]
    states = {i["InstanceId"]: i["State"]["Name"] for r in state for i in r["Instances"]}
    assert states[gone["instance"]] == "terminated" and states[kept["instance"]] == "running"
    groups = {g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"]}
    assert gone["security-group"] not in groups and kept["security-group"] in groups
    templates = {t["LaunchTemplateId"] for t in ec2.describe_launch_templates()["LaunchTemplates"]}
    assert gone["launch-template"] not in templates and kept["launch-template"] in templates
    volumes = {v["VolumeId"] for v in ec2.describe_volumes()["Volumes"]}
    assert gone["volume"] not in volumes and kept["volume"] in volumes
    interfaces = {n["NetworkInterfaceId"] for n in ec2.describe_network_interfaces()["NetworkInterfaces"]}
    assert gone["network-interface"] not in interfaces and kept["network-interface"] in interfaces
    # The live cluster is whole: its machine runs and its caller group is there (its template went at launch).
    (machine,) = planted["live"]
    live = ec2.describe_instances(InstanceIds=[machine.id])["Reservations"][0]["Instances"][0]
    assert live["State"]["Name"] == "running"
    alive = [{"Name": "tag:rawvm:cluster", "Values": ["alive"]}]
    assert ec2.describe_launch_templates(Filters=alive)["LaunchTemplates"] == []
    assert {g["GroupId"] for g in live["SecurityGroups"]} <= groups
    assert dict(iter_tags(live["Tags"]))["rawvm:group"] in groups


def test_all_regions_finds_a_leftover_in_another_region_and_region_and_all_regions_exclude_each_other(
    moto: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    moto.reset()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("RAWVM_CACHE_DIR", str(tmp_path / "cache"))
    from tests.bootstrap.test_aws_moto import session

    far = session().client("ec2", region_name="ap-southeast-2", endpoint_url=moto.url)
    volume = far.create_volume(
        AvailabilityZone="ap-southeast-2a",
        Size=8,
        VolumeType="gp3",
        TagSpecifications=tag_spec("volume", {"rawvm:cluster": "far", **OLD}),
    )["VolumeId"]
    argv = ["sweep", "--all-regions", "--dry-run", "--json", "--endpoint-url", moto.url]
    assert main([*argv, "--config", str(tmp_path / "c")]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(x["kind"], x["id"], x["region"], x["monthly_usd"]) for x in listed] == [
        ("volume", volume, "ap-southeast-2", None)  # no gp3 price cached for that region: unknown
    ]
    with pytest.raises(SystemExit) as info:
        main(["sweep", "--region", REGION, "--all-regions"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
