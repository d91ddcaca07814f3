"""moto, the standard AWS mock, in SERVER mode: real HTTP on a loopback port, boto3 pointed at it.

AWS itself is a boundary these tests cannot reach; everything on our side of it (botocore's serializers,
retries, parsers, paginators) runs for real. Two things moto lacks are set up or injected here, openly:

- AWS's public SSM parameters for Ubuntu/DLAMI AMIs cannot be created through the SSM API (the /aws prefix
  is reserved), so they are put into moto's in-process parameter store, pointing at one of moto's AMIs.
- moto never runs out of capacity or throttles, so tests inject those answers at the HTTP boundary with
  botocore event handlers (see each test).
- moto evaluates a bucket policy's Deny with a Condition it cannot resolve as an unconditional Deny, so the
  staging bucket's TLS-only statements would refuse every object call. It serves plain HTTP on loopback standing
  for AWS's HTTPS, so while the server runs its bucket-policy check leaves out exactly the statements whose
  only condition is about TLS (``TlsOnlyPolicies``); every other statement is evaluated by moto as it is.
"""

from __future__ import annotations

import datetime
import json
import logging
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from moto.iam.access_control import IAMPolicy, PermissionResult
from moto.s3.models import FakeBucket
from moto.server import ThreadedMotoServer
from moto.ssm.models import Parameter, ssm_backends
from rawvm.agent.requirements import requirements_path
from rawvm.agent.uvwheel import UvArtifact, UvWheel
from rawvm.providers.aws.provider import AwsProvider

ACCOUNT = "123456789012"  # moto's default account
REGION = "us-east-1"
CALLER_IP = "203.0.113.7"
READ_PREFIXES = ("Describe", "Get", "List", "Head")
UV = UvWheel(
    "0.13.9",
    UvArtifact("uv-x86_64.whl", "https://files.pythonhosted.org/uv-x86_64.whl", "11" * 32),
    UvArtifact("uv-aarch64.whl", "https://files.pythonhosted.org/uv-aarch64.whl", "22" * 32),
)


TLS_CONDITIONS = ({"Bool": {"aws:SecureTransport": "false"}}, {"NumericLessThan": {"s3:TlsVersion": "1.2"}})


class TlsOnlyPolicies:
    """While active, moto's S3 bucket-policy check sees every request as HTTPS with TLS 1.2 or newer (what
    boto3 and the agents send to AWS): the statements that deny only plain HTTP or old TLS are left out."""

    def __enter__(self) -> TlsOnlyPolicies:
        self.original = FakeBucket.get_permission

        def get_permission(bucket: FakeBucket, action: str, resource: str) -> Any:
            """moto's own check (FakeBucket.get_permission) on the policy less its TLS-only statements; the
            bucket's policy itself is left alone (the server answers from several threads)."""
            document = json.loads(bucket.policy) if bucket.policy is not None else {"Statement": []}
            kept = [st for st in document["Statement"] if st.get("Condition") not in TLS_CONDITIONS]
            if not kept:
                return PermissionResult.NEUTRAL
            return IAMPolicy(json.dumps({**document, "Statement": kept})).is_action_permitted(action, resource)

        FakeBucket.get_permission = get_permission  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        FakeBucket.get_permission = self.original  # type: ignore[method-assign]


class MotoServer:
    def __init__(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.policies = TlsOnlyPolicies()

    def __enter__(self) -> MotoServer:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
        self.policies.__enter__()
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()
        self.policies.__exit__()

    def reset(self) -> None:
        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        urllib.request.urlopen(request, timeout=30).close()


def session() -> boto3.session.Session:
    return boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION)


def seed_public_image_parameters(ec2: Any, region: str = REGION) -> dict[str, str]:
    """Put the Ubuntu 24.04 / DLAMI public parameters into moto's store, pointing at moto's own AMIs."""
    from rawvm_images.ec2 import GPU_PARAMETERS, UBUNTU_PARAMETERS

    images = ec2.describe_images(Owners=["amazon"])["Images"]
    linux = [i for i in images if i.get("Platform") != "windows" and i.get("RootDeviceName")]
    by_arch = {
        "x86_64": next(i["ImageId"] for i in linux if i["Architecture"] == "x86_64"),
        "aarch64": next((i["ImageId"] for i in linux if i["Architecture"] == "arm64"), linux[0]["ImageId"]),
    }
    store = ssm_backends[ACCOUNT][region]._parameters
    seeded = {}
    for table in (UBUNTU_PARAMETERS, GPU_PARAMETERS):
        for arch, name in table.items():
            store[name].append(
                Parameter(  # type: ignore[abstract]
                    account_id=ACCOUNT,
                    name=name,
                    value=by_arch[arch],
                    parameter_type="String",
                    description=None,
                    allowed_pattern=None,
                    keyid=None,
                    last_modified_date=datetime.datetime.now(datetime.UTC),
                    version=1,
                    data_type="aws:ec2:image",
                )
            )
            seeded[name] = by_arch[arch]
    return seeded


@dataclass
class CallLog:
    """Every EC2 API call a client makes, recorded by a botocore ``before-call`` hook (once per call)."""

    calls: list[str] = field(default_factory=list)

    def __call__(self, model: Any, **kwargs: Any) -> None:
        self.calls.append(model.name)

    @property
    def mutating(self) -> list[str]:
        return [c for c in self.calls if not c.startswith(READ_PREFIXES)]


SENT_TEMPLATES: dict[str, dict[str, Any]] = {}
"""The last launch template data each cluster's launch sent (``rawvm:cluster`` -> LaunchTemplateData, with its own
tags under ``"TemplateTags"``): a launch deletes its template once the fleets answered, so tests read what was sent."""


def _remember_template(params: dict[str, Any], **kwargs: Any) -> None:
    data = params["LaunchTemplateData"]
    tags = dict(iter_tags(next(iter(data.get("TagSpecifications", [])), {}).get("Tags")))
    if "rawvm:cluster" not in tags:
        return  # not a launch's (a test planting a template of its own)
    template_tags = [t for s in params.get("TagSpecifications", []) for t in s["Tags"]]
    SENT_TEMPLATES[tags["rawvm:cluster"]] = {**data, "TemplateTags": template_tags}


def moto_provider(server: MotoServer, tmp: Path, bucket: str, **kw: Any) -> AwsProvider:
    """An aws provider on the moto server (the caller's address and the uv wheel fixed, caches under ``tmp``),
    with the public image parameters seeded, set up."""
    provider = AwsProvider(
        REGION,
        bucket,
        session=session(),
        endpoint_url=server.url,
        caller_ip=lambda: CALLER_IP,
        uv_wheel=UV,
        cache_dir=tmp / "cache",
        config_path=tmp / "aws.toml",
        **kw,
    )
    ec2 = provider.client("ec2", REGION)
    seed_public_image_parameters(ec2)
    for operation in ("CreateLaunchTemplate", "CreateLaunchTemplateVersion"):
        ec2.meta.events.register(f"provide-client-params.ec2.{operation}", _remember_template)
    provider.setup()
    return provider


@dataclass
class ParamLog:
    """The parameters of every S3 call a client makes or presigns, as botocore is about to serialize them
    (a ``before-parameter-build`` hook: after every ``provide-client-params`` handler, rawvm's own included)."""

    calls: list[tuple[str, dict[str, Any], bool]] = field(default_factory=list)

    def __call__(self, params: dict[str, Any], model: Any, context: dict[str, Any], **kwargs: Any) -> None:
        self.calls.append((model.name, dict(params), bool(context.get("is_presign_request"))))


def record_params(client: Any) -> ParamLog:
    log = ParamLog()
    client.meta.events.register("before-parameter-build.s3", log)
    return log


def record_calls(client: Any) -> CallLog:
    log = CallLog()
    client.meta.events.register("before-call.ec2", log)
    return log


def fake_wheel(tmp: Path) -> Path:
    """An agent wheel and the hashed requirements beside it (as build_agent_wheel leaves them)."""
    wheel = tmp / "rawvm_agent-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK\x05\x06" + b"\x00" * 18)  # an empty zip: staged and hashed, never installed here
    requirements_path(wheel).write_text("msgpack==1.1.0 \\\n    --hash=sha256:" + "0" * 64 + "\n")
    return wheel


def iter_tags(tags: list[dict[str, str]] | None) -> Iterator[tuple[str, str]]:
    for tag in tags or []:
        yield tag["Key"], tag["Value"]


def test_moto_server_answers_over_http_with_the_seeded_public_parameters() -> None:
    """The harness itself: a real HTTP server, and the seeded parameters read back through the SSM API."""
    from rawvm_images.ec2 import UBUNTU_PARAMETERS, find_image

    with MotoServer() as server:
        ec2 = session().client("ec2", endpoint_url=server.url)
        seeded = seed_public_image_parameters(ec2)
        ssm = session().client("ssm", endpoint_url=server.url)
        image = find_image(ssm, arch="x86_64", gpu=False)
        assert image.image_id == seeded[UBUNTU_PARAMETERS["x86_64"]]
        assert image.platform == "linux-x86_64"
