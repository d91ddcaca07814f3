"""Flushing logs and telemetry: into a directory, as one tar.gz PUT to a real HTTP server on loopback (the
shape of a presigned S3 URL, query and all) or POSTed as multipart/form-data (the shape of an S3 presigned
POST, parsed part by part), then to S3 itself as moto's server implements it — moto is the ecosystem's
standard stand-in for AWS, which these machines cannot reach."""

from __future__ import annotations

import io
import logging
import socket
import tarfile
import tomllib
from pathlib import Path

import pytest
import tomli_w
from aiohttp import BodyPartReader, web
from aiohttp.test_utils import TestServer
from rawvm_agent import sink
from rawvm_agent.app import Agent
from rawvm_agent.config import AgentConfig, ConfigError, config_from_dict, config_to_dict
from rawvm_agent.sink import flush


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    root = tmp_path / "state"
    (root / "logs").mkdir(parents=True)
    (root / "telemetry").mkdir()
    (root / "logs" / "task-1.stdout").write_bytes(b"hello from the task\n")
    (root / "logs" / "task-1.stderr").write_bytes(b"")
    (root / "telemetry" / "samples.msgpack").write_bytes(bytes(range(256)) * 64)
    (root / "state.json").write_text('{"phase": "stopping"}')
    return root


def sources(state_dir: Path) -> list[Path]:
    return sorted(p for p in state_dir.rglob("*") if p.is_file())


def expected(state_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(state_dir).as_posix(): p.read_bytes() for p in sources(state_dir)}


def tree(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def untar(blob: bytes) -> tuple[set[str], dict[str, bytes]]:
    """(top-level names, path under them → content) of a tar.gz."""
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        tops, files = set(), {}
        for member in tar.getmembers():
            top, _, rest = member.name.partition("/")
            tops.add(top)
            if member.isfile():
                extracted = tar.extractfile(member)
                assert extracted is not None
                files[rest] = extracted.read()
    return tops, files


async def test_directory_sink_copies_under_a_machine_and_time_subdir(state_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "sink"
    missing = state_dir / "logs" / "never-written.log"
    await flush(str(target), [*sources(state_dir), missing], label="i-0abc/def")
    [subdir] = list(target.iterdir())
    assert subdir.name.startswith("i-0abc-def-") and subdir.name.endswith("Z")
    assert tree(subdir) == expected(state_dir)


async def test_file_url_sink_and_whole_directories(state_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "sink dir"
    await flush(target.as_uri(), [state_dir / "logs", state_dir / "state.json"], label="m1")
    [subdir] = list(target.iterdir())
    assert tree(subdir) == {k: v for k, v in expected(state_dir).items() if not k.startswith("telemetry/")}


class PutServer:
    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []  # method, path?query, headers, body

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((request.method, request.path_qs, dict(request.headers), body))
        if len(self.requests) <= self.fail_first:
            return web.Response(status=503, text="<Error><Code>SlowDown</Code></Error>")
        return web.Response(status=200)


async def put_to(server_state: PutServer, files: list[Path], caplog: pytest.LogCaptureFixture) -> str:
    server = TestServer(server_state.app(), host="127.0.0.1")
    await server.start_server()
    try:
        url = str(server.make_url("/bucket/runs/m1.tar.gz")) + "?X-Amz-Signature=s3cr3t&X-Amz-Expires=600"
        with caplog.at_level(logging.INFO, logger="rawvm_agent.sink"):
            await flush(url, files, label="m1")
        return url
    finally:
        await server.close()


async def test_http_sink_puts_one_tar_gz(state_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = PutServer()
    await put_to(server, sources(state_dir), caplog)
    [(method, path_qs, headers, body)] = server.requests
    assert method == "PUT"
    assert path_qs == "/bucket/runs/m1.tar.gz?X-Amz-Signature=s3cr3t&X-Amz-Expires=600"
    # S3 refuses chunked uploads to a presigned PUT: the length must be announced.
    assert headers["Content-Length"] == str(len(body)) and "Transfer-Encoding" not in headers
    assert "Content-Type" not in headers  # presigned without one; SigV2 and SigV4 signatures cover it
    tops, files = untar(body)
    assert len(tops) == 1 and next(iter(tops)).startswith("m1-")
    assert files == expected(state_dir)
    assert "s3cr3t" not in caplog.text  # the presigned signature is a credential
    assert "PUT to http://127.0.0.1" in caplog.text


async def test_http_sink_retries_then_gives_up_without_raising(
    state_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sink, "RETRY_DELAY", 0.0)
    flaky = PutServer(fail_first=2)
    await put_to(flaky, sources(state_dir), caplog)
    assert len(flaky.requests) == 3 and untar(flaky.requests[-1][3])[1] == expected(state_dir)
    down = PutServer(fail_first=99)
    await put_to(down, sources(state_dir), caplog)  # returns: the machine must still power off
    assert len(down.requests) == sink.PUT_ATTEMPTS
    assert "failed 3 times" in caplog.text and "s3cr3t" not in caplog.text


async def test_unreachable_or_unsupported_sinks_only_log(
    state_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sink, "RETRY_DELAY", 0.0)
    server = TestServer(web.Application(), host="127.0.0.1")
    await server.start_server()
    url = str(server.make_url("/x"))
    await server.close()  # nobody listens there any more
    await flush(url, sources(state_dir), label="m1")
    await flush("s3://bucket/key", sources(state_dir), label="m1")
    await flush("", sources(state_dir))
    assert "unsupported sink s3://bucket/key" in caplog.text
    assert "failed 3 times" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("signature_version", ["s3", "s3v4"])
async def test_presigned_s3_put_lands_in_the_bucket(
    state_dir: Path, caplog: pytest.LogCaptureFixture, signature_version: str
) -> None:
    caplog.set_level(logging.INFO, logger="rawvm_agent.sink")
    """The real shape end to end: boto3 presigns put_object (SigV2 and SigV4), the sink PUTs, the object
    is the tar.gz. moto does not check presigned signatures, so this proves the request shape and the
    object, not the signature; the loopback server test above pins the headers a signature depends on."""
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    botocore_config = pytest.importorskip("botocore.config")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        s3 = boto3.client(
            "s3",
            endpoint_url=f"http://{host}:{port}",
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=botocore_config.Config(signature_version=signature_version),
        )
        s3.create_bucket(Bucket="rawvm-sink")
        url = s3.generate_presigned_url(
            "put_object", Params={"Bucket": "rawvm-sink", "Key": "runs/m1.tar.gz"}, ExpiresIn=600
        )
        await flush(url, sources(state_dir), label="m1")
        blob = s3.get_object(Bucket="rawvm-sink", Key="runs/m1.tar.gz")["Body"].read()
    finally:
        server.stop()
    assert untar(blob)[1] == expected(state_dir)
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("rawvm_agent")]
    assert any("bytes PUT to" in m for m in ours) and not any("Signature" in m for m in ours)


class PostServer:
    """Parses the multipart/form-data body the way S3's POST endpoint reads it: part by part, in order."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.parts: list[tuple[str, str | None, str, bytes]] = []  # field name, file name, content type, bytes

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        self.headers = dict(request.headers)
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            assert isinstance(part, BodyPartReader)
            content_type = part.headers.get("Content-Type", "")
            self.parts.append((part.name or "", part.filename, content_type, bytes(await part.read())))
        return web.Response(status=204)


FORM = {
    "key": "clusters/c1/sink/${filename}",
    "x-amz-algorithm": "AWS4-HMAC-SHA256",
    "x-amz-credential": "AKIAEXAMPLE/20260101/eu-west-1/s3/aws4_request",
    "x-amz-date": "20260101T000000Z",
    "policy": "eyJleHBpcmF0aW9uIjogInBvbGljeS1zZWNyZXQifQ==",
    "x-amz-signature": "5ign4tur3-0f-the-p0l1cy",
}


async def test_http_sink_with_form_posts_fields_first_and_the_tar_gz_last(
    state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    received = PostServer()
    server = TestServer(received.app(), host="127.0.0.1")
    await server.start_server()
    try:
        url = str(server.make_url("/rawvm-bucket"))
        with caplog.at_level(logging.INFO, logger="rawvm_agent.sink"):
            await flush(url, sources(state_dir), label="c1-ip-10-0-1-7", form=FORM)
    finally:
        await server.close()
    names = [name for name, *_ in received.parts]
    assert names == [*FORM, "file"]  # S3 ignores every field after the file
    assert [body.decode() for _, _, _, body in received.parts[:-1]] == list(FORM.values())
    _, filename, content_type, blob = received.parts[-1]
    assert filename is not None and filename.startswith("c1-ip-10-0-1-7-") and filename.endswith("Z.tar.gz")
    assert content_type == "application/gzip"
    tops, files = untar(blob)
    assert tops == {filename.removesuffix(".tar.gz")} and files == expected(state_dir)
    # S3 refuses a chunked POST too: the multipart body has a known length.
    assert received.headers["Content-Type"].startswith("multipart/form-data; boundary=")
    assert "Content-Length" in received.headers and "Transfer-Encoding" not in received.headers
    assert "POST to http://127.0.0.1" in caplog.text
    assert FORM["policy"] not in caplog.text and FORM["x-amz-signature"] not in caplog.text


async def test_a_refused_post_logs_neither_policy_nor_signature(
    state_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S3's SignatureDoesNotMatch answer echoes the signature it got; the agent log must not."""
    monkeypatch.setattr(sink, "RETRY_DELAY", 0.0)

    async def refuse(request: web.Request) -> web.Response:
        fields = {}
        async for part in await request.multipart():
            assert isinstance(part, BodyPartReader)
            fields[part.name] = (await part.read()).decode(errors="replace")
        text = f"<Error><Code>SignatureDoesNotMatch</Code><SignatureProvided>{fields['x-amz-signature']}"
        return web.Response(status=403, text=text + f"</SignatureProvided><StringToSign>{fields['policy']}")

    app = web.Application()
    app.router.add_post("/b", refuse)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        await flush(str(server.make_url("/b")), sources(state_dir), label="m1", form=FORM)
    finally:
        await server.close()
    assert "SignatureDoesNotMatch" in caplog.text and "POST to" in caplog.text and "failed 3 times" in caplog.text
    assert FORM["policy"] not in caplog.text and FORM["x-amz-signature"] not in caplog.text


async def test_form_fields_do_not_change_a_directory_sink(state_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "sink"
    await flush(str(target), sources(state_dir), label="m1", form=FORM)
    [subdir] = list(target.iterdir())
    assert tree(subdir) == expected(state_dir)


def test_sink_form_round_trips_through_agent_toml() -> None:
    config = AgentConfig(sink="https://rawvm-bucket.s3.eu-west-1.amazonaws.com/", sink_form=dict(FORM))
    text = tomli_w.dumps(config_to_dict(config))
    assert config_from_dict(tomllib.loads(text)) == config
    assert config_from_dict(tomllib.loads(tomli_w.dumps(config_to_dict(AgentConfig())))).sink_form == {}
    assert FORM["x-amz-signature"] not in repr(config)
    with pytest.raises(ConfigError, match="sink_form"):
        config_from_dict({"sink_form": {"key": 1}})
    with pytest.raises(ConfigError, match="sink_form"):
        config_from_dict({"sink_form": "key=x"})


def test_machines_sharing_one_agent_toml_label_their_flush_by_host_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EC2 machines of a cluster share one agent.toml (no machine_id): the host name tells them apart."""
    monkeypatch.setattr(socket, "gethostname", lambda: "ip-10-0-1-7")
    shared = Agent(AgentConfig(cluster="c1", token="t" * 32, state_dir=str(tmp_path / "a")))
    assert shared.sink_label() == "c1-ip-10-0-1-7"
    named = Agent(AgentConfig(cluster="c1", machine_id="m2", token="t" * 32, state_dir=str(tmp_path / "b")))
    assert named.sink_label() == "c1-m2"
