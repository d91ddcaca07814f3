"""The loopback stager: real HTTP on 127.0.0.1, real files."""

from __future__ import annotations

import hashlib
import http.client
from collections.abc import Iterator
from pathlib import Path

import pytest
from rawvm.providers.staging import QEMU_HOST, LoopbackStager, safe_relpath


@pytest.fixture
def stager(tmp_path: Path) -> Iterator[LoopbackStager]:
    with LoopbackStager(tmp_path / "root", sink_dir=tmp_path / "sink") as s:
        yield s


def request(stager: LoopbackStager, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", stager.port, timeout=10)
    try:
        conn.request(method, path, body=body)  # the path goes on the wire exactly as written
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_staged_files_are_served_with_their_bytes(stager: LoopbackStager, tmp_path: Path) -> None:
    src = tmp_path / "bundle.toml"
    src.write_bytes(b"format = 1\n")
    wheel = tmp_path / "x-1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK fake wheel bytes")
    urls = stager.stage([("rawvm-env.toml", src), ("wheels/x-1.0-py3-none-any.whl", wheel)])
    assert urls["rawvm-env.toml"] == f"http://127.0.0.1:{stager.port}/files/rawvm-env.toml"
    status, body = request(stager, "GET", "/files/wheels/x-1.0-py3-none-any.whl")
    assert (status, body) == (200, b"PK fake wheel bytes")
    status, body = request(stager, "GET", "/files/rawvm-env.toml")
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(b"format = 1\n").hexdigest()


def test_url_host_is_configurable_for_qemu_guests(tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_text("x")
    with LoopbackStager(url_host=QEMU_HOST) as s:
        assert s.stage([("f", src)]) == {"f": f"http://10.0.2.2:{s.port}/files/f"}
        assert s.sink_url("c1") == f"http://10.0.2.2:{s.port}/sink/c1/"


@pytest.mark.parametrize(
    "path",
    [
        "/files/../sink/secret",
        "/files/%2e%2e/outside.txt",
        "/files/a/../../outside.txt",
        "/files//etc/passwd",
        "/files/%2Fetc%2Fpasswd",
        "/files/",
        "/other",
    ],
)
def test_get_outside_the_staged_directory_is_refused(stager: LoopbackStager, tmp_path: Path, path: str) -> None:
    (tmp_path / "outside.txt").write_text("secret")
    (tmp_path / "root" / "a").mkdir()
    status, body = request(stager, "GET", path)
    assert status == 404
    assert b"secret" not in body


def test_a_symlink_out_of_the_root_is_not_followed(stager: LoopbackStager, tmp_path: Path) -> None:
    (tmp_path / "outside.txt").write_text("secret")
    (tmp_path / "root" / "link").symlink_to(tmp_path / "outside.txt")
    assert request(stager, "GET", "/files/link")[0] == 404


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../x", "", "a//b", ".hidden", "a/./b", "sp ace"])
def test_unsafe_names_cannot_be_staged(stager: LoopbackStager, tmp_path: Path, name: str) -> None:
    src = tmp_path / "f"
    src.write_text("x")
    with pytest.raises(ValueError, match="unsafe staged name"):
        stager.stage([(name, src)])
    with pytest.raises(ValueError):
        safe_relpath(name)


def test_put_sink_stores_the_upload(stager: LoopbackStager, tmp_path: Path) -> None:
    payload = bytes(range(256)) * 1000
    status, _ = request(stager, "PUT", "/sink/c1/m0/logs.tar.gz", payload)
    assert status == 201
    assert (tmp_path / "sink" / "c1" / "m0" / "logs.tar.gz").read_bytes() == payload
    # a second upload of the same name replaces it whole
    assert request(stager, "PUT", "/sink/c1/m0/logs.tar.gz", b"v2")[0] == 201
    assert (tmp_path / "sink" / "c1" / "m0" / "logs.tar.gz").read_bytes() == b"v2"
    # uploads are never served back through /files/
    assert request(stager, "GET", "/files/c1/m0/logs.tar.gz")[0] == 404


@pytest.mark.parametrize(
    "path", ["/sink/../root/evil", "/sink/%2e%2e/evil", "/sink/a/../../evil", "/files/evil", "/sink/"]
)
def test_put_outside_the_sink_is_refused(stager: LoopbackStager, tmp_path: Path, path: str) -> None:
    status, _ = request(stager, "PUT", path, b"evil")
    assert status == 403
    assert not list(tmp_path.rglob("evil"))


def test_put_over_the_size_cap_is_refused(tmp_path: Path) -> None:
    with LoopbackStager(sink_dir=tmp_path / "sink", max_upload_bytes=10) as s:
        assert request(s, "PUT", "/sink/big", b"x" * 11)[0] == 413
        assert not (tmp_path / "sink" / "big").exists()


def test_close_stops_serving_and_removes_owned_dirs(tmp_path: Path) -> None:
    s = LoopbackStager(sink_dir=tmp_path / "kept").start()
    port, root = s.port, s.root
    s.close()
    assert not root.exists()
    assert (tmp_path / "kept").is_dir()  # a sink the caller gave is the caller's
    with pytest.raises(OSError):
        http.client.HTTPConnection("127.0.0.1", port, timeout=2).request("GET", "/files/x")
