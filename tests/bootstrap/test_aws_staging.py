"""S3 staging and ``rawvm setup aws`` against moto in server mode (the standard AWS mock; AWS is unreachable
here). Presigned URLs are fetched with plain HTTP, as a machine would."""

from __future__ import annotations

import hashlib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from rawvm.aws_staging import EXPIRE_DAYS, S3Stager
from rawvm.cli import main
from rawvm.errors import RawvmError
from rawvm.providers.aws import AwsProvider, read_settings

from tests.bootstrap.test_aws_moto import REGION, MotoServer, session

pytestmark = pytest.mark.slow  # starts a moto server


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture
def provider(moto: MotoServer, tmp_path: Path) -> AwsProvider:
    moto.reset()
    return AwsProvider(
        REGION, "rawvm-stage-test", session=session(), endpoint_url=moto.url, config_path=tmp_path / "aws.toml"
    )


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


def test_sink_url_accepts_one_put(provider: AwsProvider) -> None:
    provider.setup()
    url = provider.sink_url("c1")
    request = urllib.request.Request(
        url, data=b"\x1f\x8b tarball", method="PUT", headers={"Content-Type": "application/gzip"}
    )
    urllib.request.urlopen(request, timeout=30).close()
    s3 = provider.client("s3", REGION)
    got = s3.get_object(Bucket="rawvm-stage-test", Key="clusters/c1/sink/sink.tar.gz")["Body"].read()
    assert got == b"\x1f\x8b tarball"


def test_staging_without_setup_says_what_to_run(provider: AwsProvider, tmp_path: Path) -> None:
    payload = tmp_path / "f"
    payload.write_text("x")
    with pytest.raises(RawvmError, match="run 'rawvm setup aws' first"):
        provider.stage("c1", [("f", payload)])
    stager = S3Stager(provider.client("s3", REGION), "rawvm-stage-test")
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
