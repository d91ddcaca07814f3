"""The agent channel is mutual TLS pinned to the cluster's own CA, and the token never crosses it in cleartext.

On the local provider (real agent processes on loopback): plain HTTP, TLS without a client certificate, and a
client of ANOTHER cluster (its CA pinned, its client certificate presented) are all refused; a whole
``rawvm.run`` goes through a recording TCP relay and its bytes never hold the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import rawvm
from rawvm import clusters
from rawvm.agent.client import AgentClient, AgentError
from rawvm.agent.tls import ChannelFiles, client_context, make_channel
from rawvm.options import MachineRequest
from rawvm.providers.base import Machine, MachineSpec
from rawvm.providers.local import LocalProvider
from rawvm_agent.config import AgentConfig, IdleConfig

from tests.helpers.tls import refused, strangers_answered

TOKEN = "tok-channel-" + "9" * 31


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RAWVM_STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # gettempdir() caches TMPDIR per process
    return tmp_path


@pytest.fixture
def machine(state: Path) -> Iterator[Machine]:
    provider = LocalProvider(root=state / "local")
    agent = AgentConfig(cluster="c1", token=TOKEN, idle=IdleConfig(keepalive=600))
    spec = MachineSpec("c1", MachineRequest(), agent, Path("unused.whl"), channel=clusters.new_channel("c1", 3600))
    (launched,) = provider.launch(spec)
    try:
        yield launched
    finally:
        provider.down("c1")


def record(machine: Machine) -> clusters.ClusterRecord:
    return clusters.ClusterRecord(name=machine.cluster, provider="local", token=TOKEN, machines=[machine])


async def wait_serving(machine: Machine) -> None:
    async with AgentClient.for_cluster(record(machine), machine.agent_url) as client:
        deadline = time.monotonic() + 60
        while not await client.healthz():
            assert time.monotonic() < deadline, "the local agent never served"
            await asyncio.sleep(0.1)
        assert (await client.status())["phase"] in {"booting", "installing", "ready", "idle", "busy"}


async def test_only_this_clusters_client_certificate_gets_an_answer(machine: Machine, state: Path) -> None:
    await wait_serving(machine)
    port = machine.agent_url.rsplit(":", 1)[1]
    assert machine.agent_url.startswith("https://")
    # plain HTTP: the TLS listener reads no request
    assert await refused(f"http://127.0.0.1:{port}", None, TOKEN)
    # TLS pinning the right CA, but no client certificate
    files = clusters.channel_files("c1")
    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.check_hostname = False
    no_cert.load_verify_locations(cafile=str(files.ca))
    assert await refused(machine.agent_url, no_cert, TOKEN)
    # another cluster's client: its CA pinned (so this agent is not trusted) and its certificate presented
    other, _ = make_channel("other", state / "other.tls", 3600)
    assert await refused(machine.agent_url, client_context(other), TOKEN)
    # another cluster's certificate with this cluster's CA pinned: the agent refuses the stranger's certificate
    mixed = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    mixed.check_hostname = False
    mixed.load_verify_locations(cafile=str(files.ca))
    mixed.load_cert_chain(str(other.client_cert), str(other.client_key))
    assert await refused(machine.agent_url, mixed, TOKEN)
    # the same three strangers through the helper the qemu VM test uses
    assert await strangers_answered(machine.agent_url, files, state, TOKEN) == []
    # and this cluster's own client gets its answer
    assert not await refused(machine.agent_url, record(machine).agent_ssl_context(), TOKEN)


def test_the_client_refuses_plain_http_and_records_without_tls(state: Path) -> None:
    files = ChannelFiles(state / "nothing-here")
    plain = AgentClient("http://127.0.0.1:1", TOKEN, ssl_context=ssl.create_default_context())
    with pytest.raises(AgentError, match=r"refusing the agent URL 'http://127.0.0.1:1': .*mutual TLS"):
        asyncio.run(plain.status())
    old = clusters.ClusterRecord(name="old", provider="local", token=TOKEN)
    with pytest.raises(AgentError, match="older rawvm"):  # refused before anything is sent
        asyncio.run(AgentClient.for_cluster(old, "https://127.0.0.1:1").status())
    assert not asyncio.run(AgentClient.for_cluster(old, "https://127.0.0.1:1").healthz())
    with pytest.raises(rawvm.RawvmError, match="older rawvm"):
        client_context(files)


def test_channel_files_are_private_and_the_ca_key_is_nowhere(state: Path) -> None:
    server = clusters.new_channel("c9", 3600)
    files = clusters.channel_files("c9")
    assert files.directory.stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in files.directory.iterdir()) == ["ca.pem", "client.key", "client.pem"]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in files.directory.iterdir())
    assert b"PRIVATE KEY" in server.key and b"PRIVATE KEY" not in server.cert + server.ca
    clusters.remove("c9")
    assert not files.directory.exists()


class Relay:
    """A TCP relay on 127.0.0.1 to ``target``, recording every byte in both directions."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.recorded = bytearray()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:  # the agent does not listen yet: so the client learns
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, dest: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                with self.lock:
                    self.recorded += data
                dest.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, dest):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


@pytest.mark.slow
@pytest.mark.network
def test_a_whole_run_never_sends_the_token_in_cleartext(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = state / "project"
    project.mkdir()
    (project / "requirements.txt").write_text("humanize\n")
    monkeypatch.chdir(project)
    relays: list[Relay] = []
    tokens: list[str] = []
    launch, save = LocalProvider.launch, clusters.save

    def through_relay(self: LocalProvider, spec: MachineSpec) -> list[Machine]:
        machines = launch(self, spec)
        for index, m in enumerate(machines):
            relays.append(Relay(int(m.agent_url.rsplit(":", 1)[1])))
            machines[index] = dataclasses.replace(m, agent_url=f"https://127.0.0.1:{relays[-1].port}")
        return machines

    def remembered(record: clusters.ClusterRecord) -> Path:
        tokens.append(record.token)
        return save(record)

    monkeypatch.setattr(LocalProvider, "launch", through_relay)
    monkeypatch.setattr(clusters, "save", remembered)
    out = io.StringIO()
    result = rawvm.run(
        ["python", "-c", "print('hello over mTLS')"], source="requirements.txt", keepalive="2s", output=out
    )
    for relay in relays:
        relay.close()
    assert out.getvalue() == "hello over mTLS\n" and result.exit_code == 0
    (token,) = set(tokens)
    recorded = b"".join(bytes(r.recorded) for r in relays)
    assert len(recorded) > 2000 and recorded[:1] == b"\x16"  # the relay saw the run: a TLS handshake first
    assert token.encode() not in recorded
    assert b"Bearer" not in recorded and b"hello over mTLS" not in recorded and b"/v1/" not in recorded
