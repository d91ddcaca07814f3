"""EC2 and S3 failing under the aws provider, on moto in server mode (real HTTP; see tests/bootstrap/test_aws_moto.py):
no capacity for any type, throttling bursts, a partial fleet, and 100 up/down cycles with failures injected at the
boto3 boundary. After each: a full fleet or one clear error, and nothing left behind — no instance, security
group, launch template, volume or staged object.

Faults are injected with botocore event hooks on the provider's own clients, so every byte still goes through
botocore to moto and back: ``before-send`` answers a call in EC2's or S3's own error format without sending it
(the call was refused), and ``after-call`` raises a connection error after moto has done the call (the call
happened, its answer was lost). What rawvm does about either is the product code under test: the front door's
``launch_or_release`` and the provider's ``down``.
"""

from __future__ import annotations

import functools
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ConnectionClosedError
from rawvm import launch as launching
from rawvm.errors import RawvmError
from rawvm.providers.aws.provider import AwsProvider
from rawvm.providers.base import Machine, MachineSpec

from tests import reliability
from tests.bootstrap.test_aws_moto import REGION, MotoServer, session
from tests.bootstrap.test_aws_provider import SpotShortage, make_provider, make_spec, throttle_response, xml_response

pytestmark = [pytest.mark.faults, pytest.mark.slow]

BUCKET = "rawvm-test-staging"
LIVE = ["pending", "running", "stopping", "stopped", "shutting-down"]


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RAWVM_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


@functools.cache
def observer(url: str, service: str) -> Any:
    """A client of its own (no faults injected), made once: making a boto3 client costs a second here."""
    return session().client(service, endpoint_url=url)  # type: ignore[call-overload]


def leftovers(server: MotoServer) -> dict[str, list[str]]:
    """Everything rawvm made that still exists, seen through clients of their own (no faults injected there)."""
    ec2, s3 = observer(server.url, "ec2"), observer(server.url, "s3")
    pages = ec2.get_paginator("describe_instances").paginate(
        Filters=[{"Name": "tag-key", "Values": ["rawvm:cluster"]}, {"Name": "instance-state-name", "Values": LIVE}]
    )
    instances = [i["InstanceId"] for p in pages for r in p["Reservations"] for i in r["Instances"]]
    groups = [
        g["GroupId"]
        for g in ec2.describe_security_groups()["SecurityGroups"]
        if any(t["Key"].startswith("rawvm:") for t in g.get("Tags", []))
    ]
    templates = [
        t["LaunchTemplateId"]
        for t in ec2.describe_launch_templates(Filters=[{"Name": "tag-key", "Values": ["rawvm:cluster"]}])[
            "LaunchTemplates"
        ]
    ]
    volumes = [
        v["VolumeId"]
        for p in ec2.get_paginator("describe_volumes").paginate()
        for v in p["Volumes"]
        if any(t["Key"] == "rawvm:cluster" for t in v.get("Tags", []))
    ]
    staged = [
        o["Key"]
        for p in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="clusters/")
        for o in p.get("Contents", [])
        if "/files/" in o["Key"]
    ]
    found = {"instances": instances, "groups": groups, "templates": templates, "volumes": volumes, "staged": staged}
    return {k: v for k, v in found.items() if v}


def stage_and_launch(provider: AwsProvider, spec: MachineSpec, tmp: Path) -> list[Machine]:
    """What the front door does for a new cluster, on this provider: stage a bundle file, then launch, released
    by ``launch_or_release`` when anything fails."""
    bundle_file = tmp / "rawvm-env.toml"
    bundle_file.write_text(f"format = 1  # {spec.cluster}\n")

    def launch() -> list[Machine]:
        provider.stage(spec.cluster, [("rawvm-env.toml", bundle_file)])
        return provider.launch(spec)

    return launching.launch_or_release(provider, spec.cluster, launch)


def down_until_done(provider: AwsProvider, cluster: str, attempts: int = 8) -> int:
    """'rawvm down' as a user runs it: again while it says to."""
    for _ in range(attempts):
        try:
            return provider.down(cluster)
        except RawvmError as exc:
            assert "run it again" in str(exc) or "again" in str(exc), exc
    raise AssertionError(f"rawvm down {cluster} still failing after {attempts} tries")


# -- no capacity for any type ---------------------------------------------------------------------------------


def no_capacity_anywhere(request: Any, **kwargs: Any) -> AWSResponse:
    """An instant fleet that started nothing: AWS answers 200 with an error for every type x zone it was offered."""
    body = parse_qs(request.body.decode() if isinstance(request.body, bytes) else str(request.body))
    lifecycle = body["TargetCapacitySpecification.DefaultTargetCapacityType"][0]
    items = []
    for i in range(1, 1000):
        if (key := f"LaunchTemplateConfigs.1.Overrides.{i}.InstanceType") not in body:
            break
        subnet = body[f"LaunchTemplateConfigs.1.Overrides.{i}.SubnetId"][0]
        items.append(
            f"<item><launchTemplateAndOverrides><overrides><instanceType>{body[key][0]}</instanceType>"
            f"<subnetId>{subnet}</subnetId></overrides></launchTemplateAndOverrides><lifecycle>{lifecycle}</lifecycle>"
            "<errorCode>InsufficientInstanceCapacity</errorCode><errorMessage>no capacity</errorMessage></item>"
        )
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?><CreateFleetResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">'
        f"<requestId>r</requestId><fleetId>fleet-0</fleetId><errorSet>{''.join(items)}</errorSet>"
        "<fleetInstanceSet/></CreateFleetResponse>"
    )
    return xml_response(request, 200, xml.encode())


def test_no_capacity_for_any_type_is_one_clear_error_and_nothing_is_left(moto: MotoServer, tmp_path: Path) -> None:
    moto.reset()
    provider = make_provider(moto, tmp_path)
    provider.client("ec2", REGION).meta.events.register("before-send.ec2.CreateFleet", no_capacity_anywhere)
    spec = make_spec(tmp_path, "nocap", 4, cpu=2, spot_policy="spot_with_fallback")
    with pytest.raises(RawvmError) as info:
        stage_and_launch(provider, spec, tmp_path)
    message = str(info.value)
    assert "\n" not in message and "started 0 of 4" in message
    types = {t.name for t in provider.choose_types(spec, REGION)}
    for lifecycle in ("spot", "on-demand"):
        for instance_type in types:  # every type offered, in both lifecycles, named in the one line
            assert f"{instance_type} in " in message and f"({lifecycle}): InsufficientInstanceCapacity" in message
    assert "nothing of cluster nocap was left running" in message
    assert leftovers(moto) == {}
    reliability.survived("no capacity for any type (moto)")


# -- RequestLimitExceeded bursts ------------------------------------------------------------------------------


def test_request_limit_exceeded_bursts_still_give_a_full_fleet_and_a_clean_down(
    moto: MotoServer, tmp_path: Path
) -> None:
    """Every mutating EC2 operation of the launch and the teardown is throttled twice in a row before it gets through:
    botocore's standard retry mode backs off and retries; rawvm sees a full fleet and a clean down."""
    moto.reset()
    provider = make_provider(moto, tmp_path)
    throttled: Counter[str] = Counter()

    def burst(request: Any, event_name: str, **kwargs: Any) -> AWSResponse | None:
        operation = event_name.rsplit(".", 1)[-1]
        if operation.startswith(("Describe", "Get")) or throttled[operation] >= 2:
            return None
        throttled[operation] += 1  # the operation's first two attempts: a burst of RequestLimitExceeded
        return throttle_response(request)

    provider.client("ec2", REGION).meta.events.register("before-send.ec2", burst)
    machines = stage_and_launch(provider, make_spec(tmp_path, "throttled", 6, cpu=2), tmp_path)
    assert len(machines) == 6 and all(m.state in ("pending", "running") for m in machines)
    assert provider.down("throttled") == 6
    assert throttled["CreateFleet"] == 2 and throttled["TerminateInstances"] == 2
    assert throttled["CreateLaunchTemplate"] == 2 and throttled["DeleteLaunchTemplate"] == 2
    assert leftovers(moto) == {}
    reliability.survived("RequestLimitExceeded bursts (moto)")


# -- a partial fleet ---------------------------------------------------------------------------------------------


def test_a_partial_fleet_is_a_clear_error_or_a_full_fleet_never_half(moto: MotoServer, tmp_path: Path) -> None:
    moto.reset()
    provider = make_provider(moto, tmp_path)
    SpotShortage(provider.client("ec2", REGION), available=2)  # spot capacity for 2 machines of the 5 asked
    with pytest.raises(RawvmError) as info:
        stage_and_launch(provider, make_spec(tmp_path, "half", 5, cpu=2, spot_policy="spot"), tmp_path)
    assert "started 2 of 5" in str(info.value) and "\n" not in str(info.value)
    assert leftovers(moto) == {}  # the two that started were released with everything else
    machines = stage_and_launch(
        provider, make_spec(tmp_path, "full", 5, cpu=2, spot_policy="spot_with_fallback"), tmp_path
    )
    assert Counter(m.spot for m in machines) == {True: 2, False: 3}  # the shortfall on demand: a full fleet
    assert provider.down("full") == 5
    assert leftovers(moto) == {}
    reliability.survived("partial fleet (moto)")


# -- 100 up/down cycles with random failures --------------------------------------------------------------------


class FaultInjector:
    """Random failures on a client's calls: refused before sending, or done but the answer lost."""

    def __init__(self, rng: random.Random, rate: float) -> None:
        self.rng, self.rate = rng, rate
        self.injected: Counter[str] = Counter()
        self.armed = True

    def attach(self, client: Any) -> None:
        service = client.meta.service_model.endpoint_prefix
        client.meta.events.register(f"before-send.{service}", self.before_send)
        client.meta.events.register(f"after-call.{service}", self.after_call)

    def before_send(self, request: Any, event_name: str, **kwargs: Any) -> AWSResponse | None:
        if not self.armed or self.rng.random() >= self.rate / 2:
            return None
        service, operation = event_name.split(".")[1:3]
        self.injected[f"refused {operation}"] += 1
        message = b"<Message>injected fault: refused before it was sent</Message>"
        if service == "s3":
            return xml_response(request, 400, b"<Error><Code>InjectedFault</Code>" + message + b"</Error>")
        body = b"<Response><Errors><Error><Code>InjectedFault</Code>" + message + b"</Error></Errors></Response>"
        return xml_response(request, 400, body)

    def after_call(self, event_name: str, **kwargs: Any) -> None:
        if not self.armed or self.rng.random() >= self.rate / 2:
            return
        self.injected[f"lost {event_name.split('.')[2]}"] += 1
        raise ConnectionClosedError(endpoint_url="injected: the call was done, its answer lost")


CYCLES = int(os.environ.get("RAWVM_FAULT_CYCLES", "100"))


def test_100_up_down_cycles_with_random_failures_leave_nothing(moto: MotoServer, tmp_path: Path) -> None:
    moto.reset()
    provider = make_provider(moto, tmp_path)
    injector = FaultInjector(random.Random(12), rate=0.06)
    for service in ("ec2", "s3"):
        injector.attach(provider.client(service, REGION))
    rng = random.Random(1200)
    outcomes: Counter[str] = Counter()
    leaked: dict[int, dict[str, list[str]]] = {}
    started = time.monotonic()
    for cycle in range(CYCLES):
        cluster = f"cycle-{cycle}"
        spec = make_spec(tmp_path, cluster, rng.randint(1, 3), cpu=2, spot_policy=rng.choice(["on-demand", "spot"]))
        try:
            machines = stage_and_launch(provider, spec, tmp_path)
        except RawvmError as exc:
            assert "\n" not in str(exc)
            if "run 'rawvm down" in str(exc):  # the release failed too: the user runs down, as told
                outcomes["launch failed, released by rawvm down"] += 1
                down_until_done(provider, cluster)
            else:
                outcomes["launch failed, released at once"] += 1
        else:
            assert len(machines) == spec.count  # never half a fleet
            outcomes["launched"] += 1
            assert down_until_done(provider, cluster) >= 0
        injector.armed = False  # the check below must see the truth
        if found := leftovers(moto):
            leaked[cycle] = found
            down_until_done(provider, cluster)  # do not let one leak hide the next cycles'
        injector.armed = True
    elapsed = time.monotonic() - started
    injected = sum(injector.injected.values())
    print(
        f"{CYCLES} cycles in {elapsed:.1f}s: {dict(outcomes)}; {injected} faults injected: "
        f"{dict(injector.injected.most_common(12))}"
    )
    reliability.count("cycles", CYCLES)
    reliability.count("aws_faults_injected", injected)
    reliability.count("resources_leaked", sum(len(v) for found in leaked.values() for v in found.values()))
    assert leaked == {}, f"left behind after {len(leaked)} cycles: {dict(list(leaked.items())[:5])}"
    assert leftovers(moto) == {}
    assert injected >= 50 and outcomes["launched"] >= 20 and outcomes["launch failed, released at once"] >= 10
    reliability.survived("100 up/down cycles with random AWS failures (moto)")
