"""S3 staging, the sink and ``rawvm setup aws`` against moto in server mode (the standard AWS mock; AWS is
unreachable here). Presigned URLs are fetched with plain HTTP and the sink is written by the agent's own
``rawvm_agent.sink.flush``, as a machine would. moto checks no signature, so what a signature covers is
checked on the presigned URL and policy themselves."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import shutil
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from rawvm.cli import main
from rawvm.errors import RawvmError
from rawvm.options import BACKSTOP_GRACE, MachineRequest
from rawvm.providers.aws.config import read_settings
from rawvm.providers.aws.provider import AwsProvider
from rawvm.providers.aws.staging import EXPIRE_DAYS, S3Stager
from rawvm.providers.base import Machine, MachineSpec
from rawvm_agent.config import AgentConfig
from rawvm_agent.sink import flush

from tests.agent.test_sink import expected, sources, untar
from tests.bootstrap.test_aws_moto import ACCOUNT, REGION, MotoServer, record_params, session
from tests.bootstrap.test_aws_provider import xml_response

pytestmark = pytest.mark.slow  # starts a moto server


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


BUCKET = "rawvm-stage-test"


@pytest.fixture
def provider(moto: MotoServer, tmp_path: Path) -> AwsProvider:
    moto.reset()
    return AwsProvider(REGION, BUCKET, session=session(), endpoint_url=moto.url, config_path=tmp_path / "aws.toml")


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """What an agent flushes when it stops: task output, telemetry frames, state."""
    root = tmp_path / "state"
    (root / "tasks" / "t1").mkdir(parents=True)
    (root / "telemetry").mkdir()
    (root / "tasks" / "t1" / "stdout").write_bytes(b"hello from the task\n")
    (root / "telemetry" / "samples-00000001.msgpack").write_bytes(bytes(range(256)) * 64)
    (root / "state.json").write_text('{"phase": "stopping"}')
    return root


def test_setup_makes_a_private_bucket_whose_objects_expire(provider: AwsProvider) -> None:
    region, bucket, created = provider.setup()
    assert (region, bucket, created) == (REGION, "rawvm-stage-test", True)
    s3 = provider.client("s3", REGION)
    block = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
    assert block == {
        "BlockPublicAcls": True,
        "IgnorePublicAcls": True,
        "BlockPublicPolicy": True,
        "RestrictPublicBuckets": True,
    }
    (rule,) = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert rule["Status"] == "Enabled" and rule["Expiration"]["Days"] == EXPIRE_DAYS
    assert provider.setup()[2] is False  # idempotent


def test_setup_denies_plain_http_and_encrypts_at_rest(provider: AwsProvider) -> None:
    provider.setup()
    s3 = provider.client("s3", REGION)
    (rule,) = s3.get_bucket_encryption(Bucket=BUCKET)["ServerSideEncryptionConfiguration"]["Rules"]
    assert rule["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    policy = json.loads(s3.get_bucket_policy(Bucket=BUCKET)["Policy"])
    denies = {json.dumps(st["Condition"], sort_keys=True): st for st in policy["Statement"]}
    plain = denies[json.dumps({"Bool": {"aws:SecureTransport": "false"}})]
    assert plain["Effect"] == "Deny" and plain["Principal"] == "*" and plain["Action"] == "s3:*"
    assert sorted(plain["Resource"]) == [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"]
    assert denies[json.dumps({"NumericLessThan": {"s3:TlsVersion": "1.2"}})]["Effect"] == "Deny"


def test_every_s3_call_names_the_expected_bucket_owner(provider: AwsProvider, state_dir: Path, tmp_path: Path) -> None:
    """A bucket of the predictable name made first by another account must be refused by S3 itself, on
    every call: setup, staging (the transfer manager's calls too), listing, fetching, deleting. Presigned
    GETs cannot carry it (a signed header the agent would have to send); their bytes are sha256-checked."""
    log = record_params(provider.client("s3", REGION))
    provider.setup()
    payload = tmp_path / "pylock.toml"
    payload.write_bytes(b"x" * 100)
    provider.stage("c1", [("pylock.toml", payload)])
    post = provider.sink_form_for(
        "c1", Machine("i-0aaaaaaaaaaaaaaa1", "aws", "c1", "", launched_at=time.time()), 3600.0
    )
    assert post is not None  # the machine's own form, as session.wait_ready hands it over
    asyncio.run(flush(post.url, sources(state_dir), label="c1-m1", form=post.fields))
    assert provider.fetch_sink("c1", tmp_path / "sink") == 1
    assert provider.stager().delete_files("c1") == 1
    made = {name for name, _, presigned in log.calls if not presigned}
    assert {"HeadBucket", "PutBucketPolicy", "PutBucketEncryption", "PutObject", "HeadObject"} <= made
    assert {"ListObjectsV2", "GetObject", "DeleteObjects", "PutBucketLifecycleConfiguration"} <= made
    for name, params, presigned in log.calls:
        if presigned or name == "CreateBucket":  # CreateBucket takes no owner: the bucket is not there yet
            assert "ExpectedBucketOwner" not in params, name
        else:
            assert params.get("ExpectedBucketOwner") == ACCOUNT, name
    presigned_get = next(p for n, p, presigned in log.calls if presigned and n == "GetObject")
    assert presigned_get["Key"] == "clusters/c1/files/pylock.toml"


def test_a_bucket_of_another_account_is_one_clear_line(provider: AwsProvider, tmp_path: Path) -> None:
    """S3 answers ExpectedBucketOwner of another account with a bare 403 (moto does not check the owner, so
    the answer is injected at the HTTP boundary)."""
    provider.client("s3", REGION).meta.events.register(
        "before-send.s3.HeadBucket", lambda request, **kw: xml_response(request, 403, b"")
    )
    taken = f"the staging bucket {BUCKET} belongs to another AWS account: choose another with rawvm setup aws --bucket"
    with pytest.raises(RawvmError) as info:
        provider.setup()
    assert str(info.value) == taken
    payload = tmp_path / "f"
    payload.write_text("x")
    with pytest.raises(RawvmError) as info:
        provider.stage("c1", [("f", payload)])
    assert str(info.value) == taken


def test_staged_files_come_back_byte_exact_over_presigned_get(provider: AwsProvider, tmp_path: Path) -> None:
    provider.setup()
    payload = tmp_path / "pylock.toml"
    payload.write_bytes(b"lock-version = '1.0'\n" * 100)
    urls = provider.stage("c1", [("pylock.toml", payload)])
    with urllib.request.urlopen(urls["pylock.toml"], timeout=30) as response:
        body = response.read()
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(payload.read_bytes()).hexdigest()
    assert "X-Amz-Signature=" in urls["pylock.toml"]
    # No credentials, no URL: the bucket is not public.
    plain = urls["pylock.toml"].split("?", 1)[0]
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(plain, timeout=30)
    assert info.value.code == 403


def test_unchanged_files_are_not_uploaded_again(provider: AwsProvider, tmp_path: Path) -> None:
    provider.setup()
    payload = tmp_path / "code.tar.gz"
    payload.write_bytes(b"x" * 1000)
    s3 = provider.client("s3", REGION)
    puts: list[str] = []
    s3.meta.events.register("before-call.s3.PutObject", lambda model, **kw: puts.append(model.name))
    provider.stage("c1", [("code.tar.gz", payload)])
    provider.stage("c1", [("code.tar.gz", payload)])
    payload.write_bytes(b"y" * 1000)
    provider.stage("c1", [("code.tar.gz", payload)])
    assert len(puts) == 2


def test_sink_put_url_is_sigv4_and_signs_no_content_type(provider: AwsProvider, state_dir: Path) -> None:
    """The agent's PUT sends no Content-Type; a SigV4 URL that signed one would get SignatureDoesNotMatch
    from real S3 (moto checks no signature, so the URL itself is inspected)."""
    provider.setup()
    url = provider.stager().sink_url("c1", "m1")
    query = parse_qs(urlsplit(url).query)
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert query["X-Amz-SignedHeaders"] == ["host"]
    assert "content-type" not in url.lower()
    asyncio.run(flush(url, sources(state_dir), label="c1-m1"))
    blob = provider.client("s3", REGION).get_object(Bucket=BUCKET, Key="clusters/c1/sink/m1.tar.gz")["Body"].read()
    assert untar(blob)[1] == expected(state_dir)


def test_each_machine_gets_its_own_presigned_post_for_its_own_keys_only(
    provider: AwsProvider, state_dir: Path, tmp_path: Path
) -> None:
    """Nothing about the sink is in the agent.toml every EC2 machine shares; each machine is handed its own
    presigned POST (``sink_form_for``), whose policy names that machine's key prefix only and expires once its
    backstop has powered it off. Each agent's flush becomes its own object under its own prefix, intact."""
    provider.setup()
    spec = MachineSpec(
        cluster="c1", request=MachineRequest(n=2), agent=AgentConfig(sink=provider.sink_url("c1")), agent_wheel=Path()
    )
    config = provider.machine_config(spec)
    assert config.sink == "" and config.sink_form == {}
    launched, lifetime = time.time() - 600, 3600.0
    posts = {
        mid: provider.sink_form_for("c1", Machine(mid, "aws", "c1", "", launched_at=launched), lifetime)
        for mid in ("i-0aaaaaaaaaaaaaaa1", "i-0aaaaaaaaaaaaaaa2")
    }
    for mid, post in posts.items():
        assert post is not None and post.fields["key"] == f"clusters/c1/sink/{mid}/${{filename}}"
        policy = json.loads(base64.b64decode(post.fields["policy"]))
        key_conditions = [c for c in policy["conditions"] if isinstance(c, list) and c[1] == "$key"]
        assert key_conditions and all(c == ["starts-with", "$key", f"clusters/c1/sink/{mid}/"] for c in key_conditions)
        expires = datetime.fromisoformat(policy["expiration"].replace("Z", "+00:00")).timestamp()
        assert abs(expires - (launched + lifetime + BACKSTOP_GRACE)) < 30
    other = tmp_path / "other-state"
    shutil.copytree(state_dir, other)
    (other / "tasks" / "t1" / "stdout").write_bytes(b"the second machine's output\n")
    one, two = posts.values()
    assert one is not None and two is not None

    async def both() -> None:
        await flush(one.url, sources(state_dir), label="c1-ip-10-0-1-7", form=one.fields)
        await flush(two.url, sources(other), label="c1-ip-10-0-1-8", form=two.fields)

    asyncio.run(both())
    s3 = provider.client("s3", REGION)
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="clusters/c1/")["Contents"])
    assert len(keys) == 2 and all(k.endswith(".tar.gz") for k in keys)
    first, second = (s3.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys)
    assert keys[0].startswith("clusters/c1/sink/i-0aaaaaaaaaaaaaaa1/c1-ip-10-0-1-7-") and untar(first) == (
        {keys[0].rsplit("/", 1)[1].removesuffix(".tar.gz")},
        expected(state_dir),
    )
    assert keys[1].startswith("clusters/c1/sink/i-0aaaaaaaaaaaaaaa2/c1-ip-10-0-1-8-") and untar(second)[1] == expected(
        other
    )
    gone = Machine("i-0old", "aws", "c1", "", launched_at=time.time() - lifetime - BACKSTOP_GRACE - 1)
    assert provider.sink_form_for("c1", gone, lifetime) is None  # its backstop has powered it off


def test_machine_config_leaves_another_sink_alone(provider: AwsProvider) -> None:
    spec = MachineSpec(
        cluster="c1",
        request=MachineRequest(),
        agent=AgentConfig(sink="https://example.org/put?sig=x"),
        agent_wheel=Path(),
    )
    assert provider.machine_config(spec).sink_form == {}
    assert provider.machine_config(dataclasses.replace(spec, agent=AgentConfig())).sink == ""


@pytest.mark.parametrize("region", ["us-east-1", "eu-west-1"])
def test_presigned_urls_use_the_regional_endpoint_and_sigv4(region: str, tmp_path: Path) -> None:
    """Outside us-east-1 the global endpoint answers a new bucket with a redirect a presigned request cannot
    follow; presigning is local, so this needs no AWS."""
    real = AwsProvider(region, "rawvm-staging-123456789012", session=session(), config_path=tmp_path / "aws.toml")
    stager = real.stager()
    put = urlsplit(stager.sink_url("c1", "m1"))
    post_url, fields = stager.sink_post("c1", "i-0abc", 3600)
    assert put.netloc == urlsplit(post_url).netloc == f"rawvm-staging-123456789012.s3.{region}.amazonaws.com"
    assert parse_qs(put.query)["X-Amz-Credential"][0].endswith(f"/{region}/s3/aws4_request")
    assert fields["x-amz-algorithm"] == "AWS4-HMAC-SHA256"
    assert fields["x-amz-credential"].endswith(f"/{region}/s3/aws4_request")
    dotted = AwsProvider(region, "rawvm.staging", session=session(), config_path=tmp_path / "aws.toml")
    assert urlsplit(dotted.stager().sink_url("c1")).path.startswith("/rawvm.staging/")  # TLS names no dots


def test_staging_without_setup_says_what_to_run(provider: AwsProvider, tmp_path: Path) -> None:
    payload = tmp_path / "f"
    payload.write_text("x")
    with pytest.raises(RawvmError, match="run 'rawvm setup aws' first"):
        provider.stage("c1", [("f", payload)])
    stager = S3Stager(provider.client("s3", REGION), BUCKET)
    with pytest.raises(RawvmError, match="relative path"):
        stager._key("c1", "../escape")


def test_cli_setup_aws_creates_the_bucket_and_remembers_it(
    moto: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    moto.reset()
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        monkeypatch.setenv(name, value)
    config = tmp_path / "aws.toml"
    argv = ["setup", "aws", "--region", REGION, "--endpoint-url", moto.url, "--config", str(config)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "s3://rawvm-staging-123456789012-us-east-1" in out and "created" in out
    assert read_settings(config) == {"region": REGION, "bucket": "rawvm-staging-123456789012-us-east-1"}
    s3 = session().client("s3", endpoint_url=moto.url)
    assert "rawvm-staging-123456789012-us-east-1" in [b["Name"] for b in s3.list_buckets()["Buckets"]]


def test_cli_setup_aws_unknown_region_is_one_line_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    assert main(["setup", "aws", "--region", "mars-north-1", "--config", str(tmp_path / "a.toml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown AWS region 'mars-north-1'" in err
