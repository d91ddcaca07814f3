"""A Dask cluster's EC2 launch, against moto in server mode (see test_aws_moto.py): the real launch path of
``rawvm.dask_cluster`` (lock for EC2's Ubuntu, bundle with the TLS archive staged to S3, CreateFleet) opens the
scheduler and dashboard ports to the caller's /32 only, and the workers' ports only inside the group."""

from __future__ import annotations

import base64
import gzip
from pathlib import Path

import pytest
from rawvm import launch as launching
from rawvm import session
from rawvm.api import down, launch_options
from rawvm.dask.cluster import Fleet
from rawvm.dask.options import DaskOptions
from rawvm.dask.procs import ARCHIVE_NAME, DASHBOARD_PORT, PEER_PORTS, SCHEDULER_PORT, scheduler_place
from rawvm_agent import DEFAULT_PORT

from tests.bootstrap.test_aws_moto import CALLER_IP, REGION, MotoServer
from tests.bootstrap.test_aws_provider import make_provider, template_data

pytestmark = [pytest.mark.network, pytest.mark.slow]


def test_the_clusters_ec2_launch_opens_scheduler_and_dashboard_to_the_caller_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "requirements.txt").write_text("distributed\n")
    monkeypatch.chdir(tmp_path / "project")
    monkeypatch.setenv("RAWVM_STATE_DIR", str(tmp_path / "state"))
    with MotoServer() as moto:
        provider = make_provider(moto, tmp_path)
        for module in (launching, session):  # where a launch, and then 'down', find their provider
            monkeypatch.setattr(module, "get_provider", lambda name, **options: provider)
        launch = launch_options(provider="aws", cpu=2, region=REGION, source="requirements.txt")
        options = DaskOptions(name="dask-moto", launch=launch)
        fleet = Fleet(options, tmp_path / "state" / "dask" / "dask-moto")
        launched = fleet._launch_sync(3, "", "dask-moto")  # the scheduler's machine and two workers', one launch
        ec2 = provider.client("ec2", REGION)

        (group_id,) = template_data(ec2, "dask-moto")["SecurityGroupIds"]
        (group,) = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"]
        from_caller = sorted(
            (r["FromPort"], r["ToPort"], ip["CidrIp"]) for r in group["IpPermissions"] for ip in r.get("IpRanges", [])
        )
        assert from_caller == [
            (DEFAULT_PORT, DEFAULT_PORT, f"{CALLER_IP}/32"),
            (SCHEDULER_PORT, SCHEDULER_PORT, f"{CALLER_IP}/32"),
            (DASHBOARD_PORT, DASHBOARD_PORT, f"{CALLER_IP}/32"),
        ]
        from_group = [
            (r["FromPort"], r["ToPort"], pair["GroupId"])
            for r in group["IpPermissions"]
            for pair in r.get("UserIdGroupPairs", [])
        ]
        assert from_group == [(*PEER_PORTS, group_id)]  # workers and nannies: only the group's own machines
        assert not any(r.get("Ipv6Ranges") or r.get("PrefixListIds") for r in group["IpPermissions"])

        # the TLS files travel as a staged bundle file (sha256 in agent.toml), never in the user-data
        raw = base64.b64decode(template_data(ec2, "dask-moto")["UserData"])
        user_data = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode()
        assert ARCHIVE_NAME in user_data
        assert fleet.tls.node_key.read_text().splitlines()[1] not in user_data
        assert user_data.count("BEGIN PRIVATE KEY") == 1  # only the agent channel's key (its own 0600 file)

        machines = launched.record.machines
        assert len(machines) == 3 and all(m.details.get("private_ip") for m in machines)
        place = scheduler_place("aws", machines[0])
        public = machines[0].agent_url.split("://")[1].rsplit(":", 1)[0]
        assert place.client_address == f"tls://{public}:{SCHEDULER_PORT}"
        assert place.worker_address == f"tls://{machines[0].details['private_ip']}:{SCHEDULER_PORT}"
        down("dask-moto")
