"""``rawvm logs`` for stopped qemu and EC2 machines: their agents' flushes are fetched from the provider's sink
(``fetch_sink``) into this host's sink directory, then read like the local provider's.

The flushes are made by the agent's own ``rawvm_agent.sink.flush``, as a stopping machine makes them: for qemu
PUT over real HTTP into the provider's detached loopback server (no VM is booted), for aws POSTed with the
cluster's presigned form to moto in server mode (the standard AWS mock; AWS is unreachable here)."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from rawvm import api, clusters, sinks
from rawvm.errors import RawvmError
from rawvm.providers.aws.provider import AwsProvider
from rawvm.providers.base import Machine
from rawvm.providers.qemu import QemuProvider
from rawvm_agent.sink import flush

from tests.bootstrap.test_aws_moto import REGION, MotoServer, session

pytestmark = pytest.mark.slow  # starts the qemu provider's server process, and a moto server

STOPPED_AGENT = "http://127.0.0.1:1"  # nothing listens: the machine has stopped
BUCKET = "rawvm-logs-test"


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "state"
    monkeypatch.setenv("RAWVM_STATE_DIR", str(root))
    return root


def agent_state(root: Path, stdout: bytes) -> list[Path]:
    """What an agent's state_dir holds when it stops, as the files it flushes (rawvm_agent.app.sink_files)."""
    task = root / "tasks" / "t1"
    task.mkdir(parents=True)
    (task / "task.json").write_text(json.dumps({"id": "t1", "argv": ["python", "job.py"], "started_at": 100.0}))
    (task / "stdout").write_bytes(stdout)
    (task / "stderr").write_bytes(b"")
    (root / "agent.log").write_text("flushing 5 files to the sink\n")
    (root / "telemetry").mkdir()
    (root / "telemetry" / "samples-00000001.msgpack").write_bytes(b"\x92\x01\x02")
    return sorted(p for p in root.rglob("*") if p.is_file())


def record(name: str, provider: str, machine_ids: list[str], options: dict[str, str] | None = None) -> None:
    machines = [Machine(id=m, provider=provider, cluster=name, agent_url=STOPPED_AGENT) for m in machine_ids]
    clusters.save(clusters.ClusterRecord(name, provider, "token", machines=machines, provider_options=options or {}))


def forget(name: str, provider: str, options: dict[str, str]) -> None:
    """As 'rawvm ls' does once the machines are gone, and with nothing fetched yet: only the note made at launch
    (``remember_sink_provider``) is left in the sink directory."""
    clusters.remove(name)
    shutil.rmtree(sinks.sink_dir(name))
    sinks.remember_sink_provider(name, provider, options)


# -- qemu --------------------------------------------------------------------------------------------------------


@pytest.fixture
def qemu(state: Path) -> Iterator[QemuProvider]:
    provider = QemuProvider()  # state under RAWVM_STATE_DIR, as the front door makes it
    yield provider
    for cluster_dir in sorted((state / "qemu").glob("*")):
        provider.down(cluster_dir.name)  # ends the detached server


def test_a_stopped_qemu_machines_output_comes_back_from_its_sink(
    qemu: QemuProvider, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    machine_id = "c1-0123abcd"
    # The agent PUTs <sink prefix><machine>.tar.gz (the guest's 10.0.2.2 is this host's loopback) under its
    # label, cluster-machine_id (rawvm_agent.app.sink_label).
    url = qemu.sink_url("c1").replace("http://10.0.2.2:", "http://127.0.0.1:") + f"{machine_id}.tar.gz"
    (qemu.cluster_dir("c1") / "machines" / machine_id).mkdir(parents=True)  # launched: its flush is expected
    asyncio.run(flush(url, agent_state(tmp_path / "agent", b"hello from the qemu guest\n"), label=f"c1-{machine_id}"))
    assert (qemu.cluster_dir("c1") / "sink" / f"{machine_id}.tar.gz").is_file()

    record("c1", "qemu", [machine_id])
    out = io.StringIO()
    assert api.logs("c1", output=out) == 0
    assert out.getvalue() == "hello from the qemu guest\n"
    assert "0123abcd has stopped" in capsys.readouterr().err
    (flushed,) = sinks.sink_dir("c1").glob("c1-c1-0123abcd-*")
    assert (flushed / "agent.log").is_file() and (flushed / "telemetry" / "samples-00000001.msgpack").is_file()
    assert qemu.fetch_sink("c1", sinks.sink_dir("c1")) == 0  # already fetched

    forget("c1", "qemu", {})
    out = io.StringIO()
    assert api.logs("c1", output=out) == 0
    assert out.getvalue() == "hello from the qemu guest\n"


def test_an_unsafe_flush_is_refused_and_the_others_still_show(
    qemu: QemuProvider, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sink = qemu.cluster_dir("c2") / "sink"
    sink.mkdir(parents=True)
    good = tmp_path / "good"
    asyncio.run(flush(str(good), agent_state(tmp_path / "agent", b"fine\n"), label="c2-c2-aaaa0000"))
    with tarfile.open(sink / "c2-aaaa0000.tar.gz", "w:gz") as tar:
        tar.add(next(good.iterdir()), arcname=next(good.iterdir()).name)
    evil = tmp_path / "evil.txt"
    evil.write_text("outside\n")
    with tarfile.open(sink / "c2-bbbb0000.tar.gz", "w:gz") as tar:
        tar.add(evil, arcname="../../escaped.txt")

    with pytest.raises(RawvmError, match=r"c2-bbbb0000\.tar\.gz: .*outside"):
        qemu.fetch_sink("c2", sinks.sink_dir("c2"))
    assert not list(sinks.sink_dir("c2").parent.parent.rglob("escaped.txt"))
    record("c2", "qemu", ["c2-aaaa0000", "c2-bbbb0000"])
    out = io.StringIO()
    assert api.logs("c2", output=out) == 0
    assert out.getvalue() == "[aaaa0000] fine\n"
    err = capsys.readouterr().err
    assert "cannot fetch the logs" in err and "bbbb0000: its agent does not answer" in err


# -- aws ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture
def aws(moto: MotoServer, state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The cluster's provider options; the front door builds its AwsProvider from them (credentials: env)."""
    moto.reset()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    AwsProvider(REGION, BUCKET, session=session(), endpoint_url=moto.url).setup()
    return {"region": REGION, "bucket": BUCKET, "endpoint_url": moto.url}


def test_stopped_ec2_machines_output_comes_back_from_s3_per_machine(
    aws: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    provider = AwsProvider(**aws)  # type: ignore[arg-type]

    async def two_machines_stop() -> None:
        # One agent.toml for the cluster: each agent labels its flush with its host name, and POSTs it with the
        # form handed to it alone (its instance's key prefix).
        for host, text in (("ip-10-0-1-7", b"output of one\n"), ("ip-10-0-1-8", b"output of two\n")):
            url, form = provider.sink_post("c3", f"i-{host}", 3600)
            await flush(url, agent_state(tmp_path / host, text), label=f"c3-{host}", form=form)

    asyncio.run(two_machines_stop())
    record("c3", "aws", ["i-0aaaaaaaaaaaaaaa1", "i-0aaaaaaaaaaaaaaa2"], aws)
    out = io.StringIO()
    assert api.logs("c3", output=out) == 0
    assert out.getvalue() == "[ip-10-0-1-7] output of one\n[ip-10-0-1-8] output of two\n"
    assert "ip-10-0-1-8 has stopped" in capsys.readouterr().err
    assert provider.fetch_sink("c3", sinks.sink_dir("c3")) == 0  # same keys, same ETags: nothing downloaded

    forget("c3", "aws", aws)
    out = io.StringIO()
    assert api.logs("c3", output=out) == 0
    assert out.getvalue() == "[ip-10-0-1-7] output of one\n[ip-10-0-1-8] output of two\n"
    assert sorted(p.name.rsplit("-", 1)[0] for p in sinks.sink_dir("c3").glob("c3-*")) == [
        "c3-ip-10-0-1-7",
        "c3-ip-10-0-1-8",
    ]
