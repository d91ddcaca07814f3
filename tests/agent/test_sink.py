"""Flushing logs and telemetry: into a directory, and as one tar.gz PUT to a real HTTP server on loopback
(the shape of a presigned S3 URL, query and all), then to S3 itself as moto's server implements it — moto
is the ecosystem's standard stand-in for AWS, which these machines cannot reach."""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from rawvm_agent import sink
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
    assert "Content-Type" not in headers  # presigned without one; a SigV2 signature covers it
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
