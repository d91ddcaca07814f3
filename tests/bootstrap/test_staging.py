"""The loopback stager: real HTTP on 127.0.0.1, real files. Paths in these tests are written after the
stager's capability (``request`` puts ``/<capability>`` first) unless a test is about the capability itself."""

from __future__ import annotations

import hashlib
import http.client
from collections.abc import Iterator
from pathlib import Path

import pytest
from rawvm.providers.qemu import machine_flushes
from rawvm.providers.staging import QEMU_HOST, LoopbackStager, safe_relpath

EXPECTED = frozenset({"c1/m0/logs.tar.gz", "big", "m1.tar.gz"})


@pytest.fixture
def stager(tmp_path: Path) -> Iterator[LoopbackStager]:
    with LoopbackStager(tmp_path / "root", sink_dir=tmp_path / "sink", expected_uploads=lambda: EXPECTED) as s:
        yield s


def request(
    stager: LoopbackStager, method: str, path: str, body: bytes | None = None, *, capability: str | None = None
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", stager.port, timeout=10)
    try:
        prefix = f"/{stager.capability if capability is None else capability}"
        conn.request(method, prefix + path, body=body)  # the path goes on the wire exactly as written
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
    assert urls["rawvm-env.toml"] == f"http://127.0.0.1:{stager.port}/{stager.capability}/files/rawvm-env.toml"
    status, body = request(stager, "GET", "/files/wheels/x-1.0-py3-none-any.whl")
    assert (status, body) == (200, b"PK fake wheel bytes")
    status, body = request(stager, "GET", "/files/rawvm-env.toml")
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(b"format = 1\n").hexdigest()


def test_url_host_is_configurable_for_qemu_guests(tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_text("x")
    with LoopbackStager(url_host=QEMU_HOST) as s:
        assert s.stage([("f", src)]) == {"f": f"http://10.0.2.2:{s.port}/{s.capability}/files/f"}
        assert s.sink_url("c1") == f"http://10.0.2.2:{s.port}/{s.capability}/sink/c1/"


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
    # a second upload of the same name replaces it whole (a batch machine flushes its results as it goes)
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
    with LoopbackStager(sink_dir=tmp_path / "sink", max_upload_bytes=10, expected_uploads=lambda: EXPECTED) as s:
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


def test_capabilities_are_random_and_long() -> None:
    one, two = LoopbackStager(), LoopbackStager()
    try:
        assert one.capability != two.capability
        assert len(one.capability) >= 32  # 24 random bytes in url-safe base64: 192 bits
    finally:
        one.close()
        two.close()


@pytest.mark.parametrize("capability", ["", "files", "0" * 32, "{cap}x", "{cap_short}", "%2e%2e"])
def test_without_the_capability_nothing_is_served_or_stored(
    stager: LoopbackStager, tmp_path: Path, capability: str
) -> None:
    """Every local user and every qemu guest reaches this port: only the URLs given to the cluster's machines
    work, and a refusal says nothing about why."""
    (tmp_path / "root" / "node.key").write_text("secret")
    wrong = capability.format(cap=stager.capability, cap_short=stager.capability[:-1])
    for path in ("/files/node.key", "/sink/m1.tar.gz"):
        assert request(stager, "GET", path, capability=wrong) == (404, b"")
    assert request(stager, "PUT", "/sink/m1.tar.gz", b"forged", capability=wrong) == (403, b"")
    assert request(stager, "GET", "/files/node.key", capability=None) == (200, b"secret")
    assert not (tmp_path / "sink" / "m1.tar.gz").exists()
    assert request(stager, "GET", "/node.key", capability="files") == (404, b"")  # the old layout is gone


@pytest.mark.parametrize("name", ["m2.tar.gz", "c1/m0/other.tar.gz", "m1.tar.gz.bak", "batch.json"])
def test_put_only_to_the_expected_flush_names(stager: LoopbackStager, tmp_path: Path, name: str) -> None:
    assert request(stager, "PUT", f"/sink/{name}", b"forged") == (403, b"")
    assert not list((tmp_path / "sink").rglob("*"))
    assert request(stager, "PUT", "/sink/m1.tar.gz", b"flush")[0] == 201


def test_refusals_carry_no_body(stager: LoopbackStager) -> None:
    assert request(stager, "GET", "/files/missing") == (404, b"")
    assert request(stager, "PUT", "/sink/../x", b"x") == (403, b"")


def test_the_qemu_stager_expects_one_flush_per_launched_machine(tmp_path: Path) -> None:
    """``machines/<id>/`` is made before the machine's VM starts; a stray file there names no machine."""
    assert machine_flushes(tmp_path) == frozenset()
    (tmp_path / "machines" / "c1-0123abcd").mkdir(parents=True)
    (tmp_path / "machines" / "c1-4567ef01").mkdir()
    (tmp_path / "machines" / "stray").write_text("")
    assert machine_flushes(tmp_path) == {"c1-0123abcd.tar.gz", "c1-4567ef01.tar.gz"}
