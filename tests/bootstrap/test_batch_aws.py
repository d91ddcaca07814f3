"""A 1000-task batch on 100 EC2 machines (moto in server mode): one launch, and the task list staged as a
sha256-checked S3 object beside the bundle, so the user-data every machine shares stays small."""

from __future__ import annotations

import base64
import dataclasses
import gzip
import hashlib
import json
import tomllib
import urllib.request
from pathlib import Path

import pytest
import yaml
from rawvm.agent.userdata import AGENT_TOML, USER_DATA_LIMIT
from rawvm.batches import array as batches
from rawvm.batches import plan as batch_plan
from rawvm_agent.batch import BatchSpec

from tests.bootstrap.test_aws_moto import REGION, MotoServer, record_calls
from tests.bootstrap.test_aws_provider import SpotShortage, make_provider, make_spec, mutating_calls, template_data

pytestmark = pytest.mark.slow


def test_a_1000_task_batch_on_100_machines_is_one_launch_with_small_user_data(tmp_path: Path) -> None:
    ids = batch_plan.parse_array("0-999")
    machines = batch_plan.machines_needed(len(ids), 100, tasks_per_machine=4)
    assert machines == 100
    spec = batch_plan.make_spec(
        ["python", "process.py"],
        ids,
        None,
        machines=machines,
        tasks_per_machine=4,
        max_retries=2,
        task_timeout_s=0,
        gpu=False,
    )
    with MotoServer() as server:
        provider = make_provider(server, tmp_path)
        ec2 = provider.client("ec2", REGION)
        provider.launch(make_spec(tmp_path, "warmup", 1, cpu=2))  # the caller's security group, made once
        log = record_calls(ec2)
        SpotShortage(ec2, available=60)

        path, digest = batches.write_spec(spec, tmp_path)
        urls = provider.stage("big-batch", [(batches.SPEC_FILE, path)])
        base = make_spec(tmp_path, "big-batch", machines, cpu=2, spot_policy="spot_with_fallback")
        machine_spec = dataclasses.replace(base, agent=batches.with_batch(base.agent, urls, digest))
        launched = provider.launch(machine_spec)

        assert len(launched) == 100
        assert mutating_calls(log.calls) == [
            "CreateLaunchTemplate",
            "CreateFleet",
            "CreateFleet",
            "DeleteLaunchTemplate",
        ]
        raw = base64.b64decode(template_data(ec2, "big-batch")["UserData"])
        assert len(raw) <= 16 * 1024 and USER_DATA_LIMIT == 16 * 1024
        text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode()
        files = {f["path"]: f["content"] for f in yaml.safe_load(text)["write_files"]}
        agent_toml = tomllib.loads(files[AGENT_TOML])
        assert agent_toml["batch"]["spec_sha256"] == digest and agent_toml["batch"]["index"] == -1
        assert "process.py" not in text  # the task list is not inlined
        # What every machine fetches: the presigned object, whose bytes hash to what agent.toml says
        with urllib.request.urlopen(agent_toml["batch"]["spec_url"]) as resp:
            body = resp.read()
        assert hashlib.sha256(body).hexdigest() == digest
        staged = BatchSpec.from_json(json.loads(body))
        assert staged.ids == ids and staged.machines == 100
