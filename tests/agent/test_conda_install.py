"""install_conda_lock: a real conda-lock.yml (locked by the resolver from a local channel) installed with rattler.

The channel is built in the test (tests/resolver/test_conda_channel.py); it is served both as file:// and over
HTTP from a loopback server, the way a VM reaches a real channel.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import json
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from rawvm_agent.conda_install import CondaInstallError, install_conda_lock
from rawvm_resolver.conda import CondaInput, lock_conda
from rawvm_resolver.target import Target

from tests.resolver.test_conda_channel import DemoPackage, build_demo_channel, write_package

CUDA = Target(arch="x86_64", python="3.11", accelerator="cuda", cuda="12.8")
CPU = Target(arch="x86_64", python="3.11")


@pytest.fixture
def channel(tmp_path: Path) -> Path:
    return build_demo_channel(tmp_path / "channel")


def _write_lock(path: Path, channel: str, target: Target) -> Path:
    path.write_bytes(lock_conda(CondaInput((), ("demo",), ()), target, channels=[channel]))
    return path


def _tamper_cuda_build(channel: Path) -> None:
    """Overwrite demo-1.0-cuda_0.tar.bz2 with other content after locking: the lock's hashes no longer fit."""
    write_package(channel, DemoPackage("linux-64", "demo", "1.0", "cuda_0", files={"share/demo/flavour": b"evil\n"}))


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def _serve(channel: Path, tls: ssl.SSLContext | None = None) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(channel)))
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def served(channel: Path) -> Iterator[str]:
    """The channel over HTTP on loopback; stopped at teardown."""
    yield from _serve(channel)


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
                 issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool) -> x509.Certificate:  # fmt: skip
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        ).add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture
def private_ca_served(channel: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The channel over HTTPS with a certificate from a private CA, as behind a TLS-intercepting proxy."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("rawvm test CA", ca_key, None, ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _certificate("127.0.0.1", key, ca, ca_key, ca=False)
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "server.pem").write_bytes(
        leaf.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(tmp_path / "server.pem")
    for url in _serve(channel, tls):
        yield url, tmp_path / "ca.pem"


async def test_installs_the_cuda_build_into_the_prefix(channel: Path, tmp_path: Path) -> None:
    lock = _write_lock(tmp_path / "conda-lock.yml", str(channel), CUDA)
    prefix = tmp_path / "prefix"
    calls: list[tuple[int, int]] = []
    await install_conda_lock(
        lock, prefix, platform="linux-64", progress=lambda done, total: calls.append((done, total)),
        cache_dir=tmp_path / "cache",
    )  # fmt: skip
    assert (prefix / "share" / "demo" / "flavour").read_text() == "cuda_0\n"
    assert (prefix / "share" / "libdemo" / "flavour").read_text() == "0\n"
    record = json.loads((prefix / "conda-meta" / "demo-1.0-cuda_0.json").read_text())
    assert record["url"] == f"{channel.as_uri()}/linux-64/demo-1.0-cuda_0.tar.bz2"
    assert record["files"] == ["share/demo/flavour"]
    assert (prefix / "conda-meta" / "libdemo-1.2-0.json").is_file()
    assert calls[0] == (0, 2)
    assert calls[-1] == (2, 2)


async def test_installs_over_http_like_a_vm(served: str, tmp_path: Path) -> None:
    lock = _write_lock(tmp_path / "conda-lock.yml", served, CPU)
    assert f"url: {served}linux-64/demo-1.0-cpu_0.tar.bz2" in lock.read_text()
    prefix = tmp_path / "prefix"
    await install_conda_lock(lock, prefix, platform="linux-64", cache_dir=tmp_path / "cache")
    assert (prefix / "share" / "demo" / "flavour").read_text() == "cpu_0\n"
    assert sorted(p.name for p in (prefix / "conda-meta").glob("*.json")) == [
        "demo-1.0-cpu_0.json",
        "libdemo-1.2-0.json",
    ]


async def test_https_channel_with_a_private_ca(
    private_ca_served: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A VM behind a TLS-intercepting proxy: the proxy's CA in SSL_CERT_FILE is what rattler must trust."""
    url, ca = private_ca_served
    lock = _write_lock(tmp_path / "conda-lock.yml", str(tmp_path / "channel"), CPU)
    lock.write_text(lock.read_text().replace((tmp_path / "channel").as_uri() + "/", url))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)  # the system store alone does not know the private CA
    with pytest.raises(CondaInstallError, match=r"(?i)certificate"):
        await install_conda_lock(lock, tmp_path / "untrusted", platform="linux-64", cache_dir=tmp_path / "cache")
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    await install_conda_lock(lock, tmp_path / "prefix", platform="linux-64", cache_dir=tmp_path / "cache")
    assert (tmp_path / "prefix" / "share" / "demo" / "flavour").read_text() == "cpu_0\n"


async def test_tampered_package_over_http_is_refused(channel: Path, served: str, tmp_path: Path) -> None:
    lock = _write_lock(tmp_path / "conda-lock.yml", served, CUDA)
    _tamper_cuda_build(channel)
    prefix = tmp_path / "prefix"
    with pytest.raises(CondaInstallError, match="hash mismatch") as info:
        await install_conda_lock(lock, prefix, platform="linux-64", cache_dir=tmp_path / "cache")
    assert "\n" not in str(info.value)
    assert not (prefix / "share" / "demo").exists()


async def test_tampered_local_package_is_refused_before_anything_is_installed(channel: Path, tmp_path: Path) -> None:
    lock = _write_lock(tmp_path / "conda-lock.yml", str(channel), CUDA)
    _tamper_cuda_build(channel)
    prefix = tmp_path / "prefix"
    with pytest.raises(CondaInstallError, match=r"demo-1.0-cuda_0.tar.bz2 does not match the hash in the lock"):
        await install_conda_lock(lock, prefix, platform="linux-64", cache_dir=tmp_path / "cache")
    assert not prefix.exists()


async def test_platform_missing_from_the_lock(channel: Path, tmp_path: Path) -> None:
    lock = _write_lock(tmp_path / "conda-lock.yml", str(channel), CPU)
    with pytest.raises(CondaInstallError, match=r"no packages for linux-aarch64 \(it has: linux-64\)"):
        await install_conda_lock(lock, tmp_path / "prefix", platform="linux-aarch64", cache_dir=tmp_path / "cache")


async def test_default_platform_is_this_machine(channel: Path, tmp_path: Path) -> None:
    import rattler

    target = CPU if str(rattler.Subdir.current()) == "linux-64" else Target(arch="aarch64", python="3.11")
    lock = _write_lock(tmp_path / "conda-lock.yml", str(channel), target)
    await install_conda_lock(lock, tmp_path / "prefix", cache_dir=tmp_path / "cache")
    assert (tmp_path / "prefix" / "share" / "demo" / "flavour").read_text() == "cpu_0\n"


@pytest.mark.slow
def test_short_lived_process_exits_cleanly(channel: Path, tmp_path: Path) -> None:
    """A process that installs and exits must not be aborted by py-rattler's threads at exit.

    A statistical guard: without the pause at exit, 6 of 30 such runs aborted here.
    """
    lock = _write_lock(tmp_path / "conda-lock.yml", str(channel), CPU)
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from rawvm_agent.conda_install import install_conda_lock\n"
        "asyncio.run(install_conda_lock(Path(sys.argv[1]), Path(sys.argv[2]), platform='linux-64',"
        " cache_dir=Path(sys.argv[3])))\n"
    )
    for run in range(10):
        prefix, cache = tmp_path / f"prefix{run}", tmp_path / "cache"
        result = subprocess.run(
            [sys.executable, "-c", script, str(lock), str(prefix), str(cache)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert (prefix / "conda-meta" / "demo-1.0-cpu_0.json").is_file()


async def test_unreadable_lock(tmp_path: Path) -> None:
    lock = tmp_path / "conda-lock.yml"
    lock.write_text("version: 1\npackage: {\n")
    with pytest.raises(CondaInstallError, match=r"conda-lock\.yml is no readable conda lock"):
        await install_conda_lock(lock, tmp_path / "prefix", platform="linux-64")


async def test_missing_conda_extra_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """rattler made unimportable (sys.modules entry None), as on a VM without the extra."""
    monkeypatch.setitem(sys.modules, "rattler", None)
    with pytest.raises(CondaInstallError, match=r"py-rattler is missing: install rawvm-agent\[conda\]"):
        await install_conda_lock(tmp_path / "conda-lock.yml", tmp_path / "prefix", platform="linux-64")
