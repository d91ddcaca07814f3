"""The agent channel on EC2 (moto): the user-data and the launch template hold no API token (only its sha256),
the template is gone once the fleet answered, agents are reached over ``https://``, and presigned downloads
expire when no boot can need them any more."""

from __future__ import annotations

import base64
import gzip
import hashlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from rawvm.agent.userdata import AGENT_TLS_DIR, AGENT_TOML
from rawvm.options import BACKSTOP_GRACE

from tests.bootstrap.test_aws_moto import REGION, SENT_TEMPLATES, MotoServer, record_calls
from tests.bootstrap.test_aws_provider import TOKEN, make_provider, make_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


def expires_in(url: str) -> int:
    return int(parse_qs(urlsplit(url).query)["X-Amz-Expires"][0])


def test_no_token_in_user_data_or_template_which_is_gone_and_agents_are_https(moto: MotoServer, tmp_path: Path) -> None:
    moto.reset()
    provider = make_provider(moto, tmp_path)
    ec2 = provider.client("ec2", REGION)
    log = record_calls(ec2)
    machines = provider.launch(make_spec(tmp_path, "sealed", 2, cpu=2))
    assert log.mutating[-1] == "DeleteLaunchTemplate"
    by_cluster = [{"Name": "tag:rawvm:cluster", "Values": ["sealed"]}]
    assert ec2.describe_launch_templates(Filters=by_cluster)["LaunchTemplates"] == []
    assert ec2.describe_launch_templates()["LaunchTemplates"] == []  # nothing left for DescribeLaunchTemplateVersions
    raw = base64.b64decode(SENT_TEMPLATES["sealed"]["UserData"])
    text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode()
    assert TOKEN not in text and hashlib.sha256(TOKEN.encode()).hexdigest() in text
    files = {f["path"]: f for f in yaml.safe_load(text)["write_files"]}
    assert files[f"{AGENT_TLS_DIR}/agent.key"]["permissions"] == "0600"
    assert "tls_ca" in files[AGENT_TOML]["content"]
    attribute = ec2.describe_instance_attribute(InstanceId=machines[0].id, Attribute="userData")
    assert TOKEN.encode() not in base64.b64decode(attribute.get("UserData", {}).get("Value", ""))
    assert all(m.agent_url.startswith("https://") for m in machines)
    assert all(m.agent_url.startswith("https://") for m in provider.list("sealed"))
    wheel_url = files["/opt/rawvm/bootstrap.sh"]["content"].split("fetch '", 2)[-1].split("'")[0]
    assert expires_in(wheel_url) == 3600  # fetched once, during the first boot
    assert provider.down("sealed") == 2  # 'rawvm down' works with the template already gone


def test_bundle_urls_last_until_the_backstop_and_no_longer(moto: MotoServer, tmp_path: Path) -> None:
    moto.reset()
    provider = make_provider(moto, tmp_path)
    source = tmp_path / "pylock.toml"
    source.write_text("lock-version = '1.0'\n")
    lifetime = 2 * 3600.0
    (url,) = provider.stage("c1", [("pylock.toml", source)], valid_s=lifetime + BACKSTOP_GRACE).values()
    assert expires_in(url) == lifetime + BACKSTOP_GRACE  # a reboot until the backstop may reinstall
    (default,) = provider.stage("c1", [("pylock.toml", source)]).values()
    assert expires_in(default) == 3600
    (capped,) = provider.stage("c1", [("pylock.toml", source)], valid_s=30 * 24 * 3600).values()
    assert expires_in(capped) == 7 * 24 * 3600  # SigV4's most
