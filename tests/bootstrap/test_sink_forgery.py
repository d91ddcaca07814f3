"""A sink nobody can forge: what machines upload is untrusted data on the laptop, and each EC2 machine may upload
only its own flushes.

- Forged flushes (a top-level ``batch.json`` or ``provider.json``, a ``../`` member, a member whose tar header
  claims 10 GiB) are refused, each in one line naming it; the laptop's records, in their own 0700 directory, stay
  as they were, and ``rawvm batch retry`` runs the original argv (local provider, for real).
- Machine output reaches the terminal without control sequences (``rawvm logs``, ``rawvm batch logs``).
- aws (moto): nothing about the sink is in the launch template's user-data; each machine is handed, once it
  serves, a presigned POST whose policy names its own key prefix only and expires at launch + max_lifetime +
  the backstop's grace.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import stat
import tarfile
import time
import tomllib
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestServer
from rawvm import clusters, sinks
from rawvm.agent.client import AgentClient, agent_session
from rawvm.agent.userdata import AGENT_TOML
from rawvm.batches import array as batches
from rawvm.files import records_dir
from rawvm.options import BACKSTOP_GRACE
from rawvm.progress import make_progress
from rawvm.providers.base import Machine
from rawvm.providers.sink_fetch import FlushCache, machine_flush_pattern
from rawvm.session import StreamWriter, printable, wait_ready
from rawvm_agent.app import Agent
from rawvm_agent.config import config_from_dict
from rawvm_agent.server import create_app, server_ssl_context

from tests.agent.core_helpers import TOKEN, agent_config
from tests.bootstrap.test_aws_moto import REGION, MotoServer, moto_provider
from tests.bootstrap.test_aws_provider import make_spec, template_data
from tests.bootstrap.test_batch_local import env, rawvm, wait_no_machines
from tests.helpers.tls import make_test_channel, secured

__all__ = ["env"]  # a fixture, imported for the batch test below

CLUSTER = "forged"
UTC = "20260101T000000Z"
TOP = f"{CLUSTER}-{CLUSTER}-m1-{UTC}"  # what machine "forged-m1" (qemu-style id) may name its flush
GIB = 1024**3
EVIL_ARGV = ["sh", "-c", "touch PWNED"]


def archive(path: Path, members: dict[str, bytes], *, mode: int = 0o644) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return path


def huge_member_archive(path: Path, name: str, size: int) -> Path:
    """A tar.gz whose one header claims ``size`` bytes (GNU base-256 size field) and holds none: a few hundred
    bytes on disk, a decompression bomb to anything that trusts the header."""
    info = tarfile.TarInfo(name)
    info.size = size
    path.write_bytes(gzip.compress(info.tobuf(tarfile.GNU_FORMAT) + b"\0" * 1024))
    return path


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "state"
    monkeypatch.setenv("RAWVM_STATE_DIR", str(root))
    return root


def plant_records(cluster: str) -> dict[str, bytes]:
    """The laptop's own records of a batch cluster, as a launch leaves them; their bytes."""
    sinks.remember_sink_provider(cluster, "local", {})
    spec = {"format": 1, "argv": ["python", "job.py"], "ids": [0], "machines": 1}
    batches.save_record(batches.BatchRecord(cluster, spec, launch={}))
    return {p.name: p.read_bytes() for p in records_dir(cluster).iterdir()}


FORGERIES: dict[str, dict[str, bytes]] = {
    "top-level batch.json": {"batch.json": json.dumps({"cluster": CLUSTER, "spec": {"argv": EVIL_ARGV}}).encode()},
    "top-level provider.json": {"provider.json": b'{"provider": "aws", "options": {"endpoint_url": "http://evil"}}'},
    "a ../ member": {f"{TOP}/../../records/{CLUSTER}/batch.json": b"{}"},
    "a second top-level dir": {f"{TOP}/agent.log": b"ok\n", f"{CLUSTER}-{CLUSTER}-m2-{UTC}/agent.log": b"not mine\n"},
    "another machine's name": {f"{CLUSTER}-{CLUSTER}-m2-{UTC}/agent.log": b"pretends to be m2\n"},
}


@pytest.mark.parametrize("forgery", FORGERIES)
def test_a_forged_flush_is_refused_in_one_line_and_the_records_stay(state: Path, tmp_path: Path, forgery: str) -> None:
    records = plant_records(CLUSTER)
    cache = FlushCache(CLUSTER, sinks.sink_dir(CLUSTER))
    forged = archive(tmp_path / "forged-m1.tar.gz", FORGERIES[forgery])
    assert not cache.unpack("forged-m1.tar.gz", "1", forged, machine_flush_pattern(CLUSTER, f"{CLUSTER}-m1"))
    (line,) = cache.errors
    assert line.startswith("forged-m1.tar.gz: ") and "\n" not in line
    assert {p.name: p.read_bytes() for p in records_dir(CLUSTER).iterdir()} == records
    assert not sinks.sink_dir(CLUSTER).exists() or not any(sinks.sink_dir(CLUSTER).iterdir())
    assert not list(state.rglob("PWNED"))


def test_a_10_gib_member_is_refused_after_one_header_and_nothing_is_kept(state: Path, tmp_path: Path) -> None:
    records = plant_records(CLUSTER)
    bomb = huge_member_archive(tmp_path / "bomb.tar.gz", f"{TOP}/telemetry/samples-00000001.msgpack", 10 * GIB)
    assert bomb.stat().st_size < 4096
    cache = FlushCache(CLUSTER, sinks.sink_dir(CLUSTER))
    started = time.monotonic()
    assert not cache.unpack("bomb.tar.gz", "1", bomb, machine_flush_pattern(CLUSTER, f"{CLUSTER}-m1"))
    assert time.monotonic() - started < 5
    (line,) = cache.errors
    assert line.startswith("bomb.tar.gz: larger than") and "refused" in line
    assert not list(state.rglob("samples-*"))
    assert {p.name: p.read_bytes() for p in records_dir(CLUSTER).iterdir()} == records


def test_too_many_members_are_refused(state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("rawvm.providers.sink_fetch.MAX_FLUSH_MEMBERS", 3)
    many = archive(tmp_path / "m.tar.gz", {f"{TOP}/f{i}": b"x" for i in range(4)})
    cache = FlushCache(CLUSTER, sinks.sink_dir(CLUSTER))
    assert not cache.unpack("m.tar.gz", "1", many, machine_flush_pattern(CLUSTER, f"{CLUSTER}-m1"))
    assert "refused" in cache.errors[0]


def test_a_good_flush_is_private_whatever_the_archive_says_and_so_is_the_state_dir(state: Path, tmp_path: Path) -> None:
    state.mkdir(mode=0o755)
    state.chmod(0o755)  # an older rawvm, or a loose umask
    good = archive(tmp_path / "m1.tar.gz", {f"{TOP}/tasks/t1/stdout": b"hi\n", f"{TOP}/agent.log": b"."}, mode=0o777)
    cache = FlushCache(CLUSTER, sinks.sink_dir(CLUSTER))
    assert cache.unpack("m1.tar.gz", "1", good, machine_flush_pattern(CLUSTER, f"{CLUSTER}-m1")), cache.errors
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    flush = sinks.sink_dir(CLUSTER) / TOP
    assert (flush / "tasks" / "t1" / "stdout").read_bytes() == b"hi\n"
    modes = {p.relative_to(flush).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in flush.rglob("*")}
    assert modes == {"tasks": 0o700, "tasks/t1": 0o700, "tasks/t1/stdout": 0o600, "agent.log": 0o600}
    assert stat.S_IMODE(records_dir(CLUSTER).stat().st_mode) == 0o700
    assert cache.has("m1.tar.gz", "1") and not FlushCache(CLUSTER, tmp_path / "elsewhere").has("m1.tar.gz", "1")


def test_control_sequences_are_stripped_from_machine_output() -> None:
    assert printable("\x1b]0;pwned\x07\x1b[31mred\x1b[0m\tok\r\n\x07\x1b[2J\x9b1m") == "red\tok\r\n1m"
    out = io.StringIO()
    writer = StreamWriter(out, "[m0] ")
    for chunk in (b"a\x1b]0;pw", b"ned\x07b\n\x1b[3", b"1mc\n"):
        writer.write(chunk)
    writer.close()
    assert "\x1b" not in out.getvalue() and "\x07" not in out.getvalue()


# -- for real: a batch retried after forged flushes, on the local provider -------------------------------------


def test_retry_after_forged_flushes_runs_the_original_argv_and_output_is_plain(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Task 1 fails once; then forged flushes arrive (as the old unpack would have left them, and through the
    fetch path); ``batch retry`` still runs the original command, from the laptop-only record."""
    ran, marker = tmp_path / "ran.txt", tmp_path / "marker"
    code = (
        "import os, sys, pathlib; i = os.environ['RAWVM_TASK_ID']; "
        f"open({str(ran)!r}, 'a').write('original ' + i + chr(10)); "
        "print('\\x1b]0;pwned\\x07\\x1b[31mred', flush=True); "
        f"m = pathlib.Path({str(marker)!r}); first = i == '1' and not m.exists(); "
        "m.write_text('ran') if first else None; sys.exit(3 if first else 0)"
    )
    first = rawvm(
        "batch", "run", "--array", "0-1", "-n", "1", "--max-retries", "0", "--keepalive", "2s",
        "--from", "requirements.txt", "--", "python", "-c", code, env=env,
    )  # fmt: skip
    cluster = first.stdout.strip()
    assert first.returncode == 1 and cluster, first.stderr
    wait_no_machines(env)
    records = {p.name: p.read_bytes() for p in records_dir(cluster).iterdir()}
    assert {"batch.json", "provider.json"} <= set(records)

    # What a forged flush made of the sink directory before: records beside the flushes. Nothing reads them now.
    sink = sinks.sink_dir(cluster)
    evil = {"cluster": cluster, "spec": {"format": 1, "argv": EVIL_ARGV, "ids": [0, 1], "machines": 1}}
    (sink / "batch.json").write_text(json.dumps({**evil, "launch": {}, "rounds": []}))
    (sink / "provider.json").write_text('{"provider": "aws", "options": {"endpoint_url": "http://evil"}}')
    cache = FlushCache(cluster, sink)
    for number, members in enumerate(FORGERIES.values()):
        forged = archive(tmp_path / f"{number}.tar.gz", {k.replace(CLUSTER, cluster): v for k, v in members.items()})
        assert not cache.unpack(forged.name, "1", forged, machine_flush_pattern(cluster, f"{cluster}-m1"))
    assert {p.name: p.read_bytes() for p in records_dir(cluster).iterdir()} == records

    for command in (("logs", cluster), ("batch", "logs", cluster, "0")):
        shown = rawvm(*command, env=env)
        assert shown.returncode == 0 and "red\n" in shown.stdout, shown.stderr
        assert "\x1b" not in shown.stdout and "\x07" not in shown.stdout and "pwned" not in shown.stdout

    retried = rawvm("batch", "retry", cluster, env=env)
    assert retried.returncode == 0, retried.stderr
    assert "retrying 1 tasks (1)" in retried.stderr
    assert sorted(ran.read_text().splitlines()) == ["original 0", "original 1", "original 1"]
    assert not list(Path(env["CWD"]).parent.rglob("PWNED"))
    wait_no_machines(env)


# -- aws: one machine's own sink upload, handed over the agent API ---------------------------------------------


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


def key_conditions(fields: dict[str, str]) -> tuple[list[Any], float]:
    """The key conditions of a presigned POST's policy (base64 JSON), and when it expires."""
    policy = json.loads(base64.b64decode(fields["policy"]))
    expires = datetime.fromisoformat(policy["expiration"].replace("Z", "+00:00")).timestamp()
    return [c for c in policy["conditions"] if isinstance(c, list) and c[1] == "$key"], expires


@pytest.mark.slow
def test_no_sink_in_the_launch_template_and_each_machine_gets_its_own_short_lived_post(
    moto: MotoServer, tmp_path: Path
) -> None:
    moto.reset()
    provider = moto_provider(moto, tmp_path, "rawvm-forgery-test", poll=0.01, sleep=lambda s: None)
    spec = make_spec(tmp_path, "solo", 3)
    assert provider.sink_url("solo") == ""  # what the launch path writes into agent.toml's sink
    machines = provider.launch(spec)
    data = template_data(provider.client("ec2", REGION), "solo")
    raw = base64.b64decode(data["UserData"])
    text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode()
    # (the x-amz-* of the agent wheel's presigned GET URL are there: that is staging, not the sink)
    assert "clusters/solo/sink" not in text and "${filename}" not in text and '"policy"' not in text.lower()
    files = {f["path"]: f["content"] for f in yaml.safe_load(text)["write_files"]}
    agent_toml = tomllib.loads(files[AGENT_TOML])
    assert agent_toml.get("sink", "") == "" and not agent_toml.get("sink_form")

    lifetime = spec.agent.idle.max_lifetime
    for machine in machines:
        post = provider.sink_form_for("solo", machine, lifetime)
        assert post is not None
        conditions, expires = key_conditions(post.fields)
        assert conditions and all(c == ["starts-with", "$key", f"clusters/solo/sink/{machine.id}/"] for c in conditions)
        assert abs(expires - (machine.launched_at + lifetime + BACKSTOP_GRACE)) < 60


@pytest.mark.slow
async def test_wait_ready_hands_each_machine_its_own_post(
    moto: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one wait every launch goes through hands a serving agent its form; the agent keeps it for its flush."""
    monkeypatch.setenv("RAWVM_STATE_DIR", str(tmp_path / "laptop"))
    moto.reset()
    provider = moto_provider(moto, tmp_path, "rawvm-forgery-test")
    channel = make_test_channel(tmp_path / "tls", "solo")  # the agent serves only mutual TLS
    agent = Agent(config_from_dict(secured(agent_config(tmp_path / "agent"), channel)))
    server = TestServer(create_app(agent))
    await server.start_server(ssl=server_ssl_context(agent.config))
    try:
        url = str(server.make_url("")).rstrip("/")
        machine = Machine("i-0123456789abcdef0", "aws", "solo", url, launched_at=time.time())
        record = clusters.ClusterRecord("solo", "aws", TOKEN, machines=[machine], max_lifetime_s=1800)
        async with agent_session() as http:
            client = AgentClient(url, TOKEN, ssl_context=channel.context(), session=http)
            await wait_ready({machine.short_id: client}, provider, record, make_progress(io.StringIO()), 60)
    finally:
        await server.close()
    assert agent.handed_sink is not None
    conditions, expires = key_conditions(agent.handed_sink.fields)
    assert conditions == [["starts-with", "$key", f"clusters/solo/sink/{machine.id}/"]] * len(conditions)
    assert abs(expires - (machine.launched_at + 1800 + BACKSTOP_GRACE)) < 60
