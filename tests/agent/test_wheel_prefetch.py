"""The lock's wheels fetched while the agent starts (rawvm_agent/wheel_prefetch.py): real uv installs from the
files that came with the hash the *verified* lock names; everything else uv downloads itself."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomli_w
from aiohttp import web
from cryptography import x509
from rawvm.agent.tls import Authority
from rawvm_agent.config import config_from_dict
from rawvm_agent.installer import Installer
from rawvm_agent.logs import Redactor
from rawvm_agent.prefetch import PREFETCH_DIR, BundlePrefetch
from rawvm_agent.state import InstallProgress
from rawvm_agent.wheel_prefetch import WheelPrefetch, is_pylock_name, uv_cache_is_empty, wheels_to_fetch

from tests.agent.core_helpers import agent_config, free_port, make_code_tar, make_wheel, sha256, write_bundle
from tests.agent.test_install import run_in


@dataclass
class Served:
    base: str  # https://127.0.0.1:port
    ca: Path
    hits: dict[str, int]
    tampered: set[str]  # served wrong the first time


@pytest.fixture
async def https_files(tmp_path: Path) -> AsyncIterator[Served]:
    """Files under ``tmp_path / "www"`` over real TLS from a private CA (as a VM behind the egress proxy)."""
    authority = Authority("rawvm wheel test CA", datetime.timedelta(hours=1))
    cert, key = authority.issue("127.0.0.1", ["server"], [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    (tmp_path / "ca.pem").write_bytes(authority.cert_pem)
    (tmp_path / "server.pem").write_bytes(cert + key)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(tmp_path / "server.pem")
    served = Served("", tmp_path / "ca.pem", {}, set())

    async def serve(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        served.hits[name] = served.hits.get(name, 0) + 1
        if name in served.tampered and served.hits[name] == 1:
            return web.Response(body=b"not the wheel")
        return web.FileResponse(tmp_path / "www" / name)

    app = web.Application()
    app.router.add_get("/{name:.+}", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=tls).start()
    served.base = f"https://127.0.0.1:{port}"
    try:
        yield served
    finally:
        await runner.cleanup()


def lock_of(wheels: list[tuple[Path, str]]) -> str:
    """A PEP 751 lock of ``(wheel, url)`` pairs, one package each, as the resolver writes it (tomli_w)."""
    packages = []
    for wheel, url in wheels:
        name, version = wheel.name.split("-")[:2]
        entry = {"url": url, "size": wheel.stat().st_size, "hashes": {"sha256": sha256(wheel)}}
        packages.append({"name": name, "version": version, "wheels": [entry]})
    return tomli_w.dumps({"lock-version": "1.0", "created-by": "rawvm", "packages": packages})


def wheel_bundle(root: Path, served: Served) -> tuple[dict[str, object], list[str]]:
    """A bundle on the https server whose lock names two wheels there (its code imports both): agent.toml's
    [bundle] and the wheels' file names."""
    www = root / "www"
    one = make_wheel(www, "tinyone", "1.0", {"tinyone.py": "VALUE = 3\n"})
    two = make_wheel(www, "tinytwo", "2.0", {"tinytwo.py": "VALUE = 4\n"})
    lock = lock_of([(w, f"{served.base}/{w.name}") for w in (one, two)])
    main = "import sys, tinyone, tinytwo\nsys.exit(tinyone.VALUE + tinytwo.VALUE)\n"
    code = make_code_tar(root / "code.tar.gz", {"main.py": main})
    files = {"pylock.toml": ("pylock", lock.encode()), "code.tar.gz": ("code", code.read_bytes())}
    bundle = write_bundle(www, files)
    for entry in bundle.files:
        entry["url"] = f"{served.base}/{entry['path']}"
    return bundle.config(), [one.name, two.name]


@pytest.mark.slow
async def test_uv_installs_the_wheels_fetched_while_the_agent_started(
    https_files: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UV_CACHE_DIR", str(tmp_path / "uv-cache"))  # empty, as on a fresh machine
    bundle, (good, tampered) = wheel_bundle(tmp_path, https_files)
    https_files.tampered = {tampered}  # the prefetch gets a wrong file for this one: uv must fetch it itself
    raw = agent_config(tmp_path / "state")
    raw["bundle"] = bundle
    raw["install"] = {**raw.get("install", {}), "ca_certs": [str(https_files.ca)]}
    config = config_from_dict(raw)
    prefetch = BundlePrefetch.for_first_start(config)  # as __main__ does, before the agent's imports
    assert prefetch is not None
    installer = Installer(config, tmp_path / "state", InstallProgress(), Redactor(), prefetch=prefetch)
    env = await installer.install()
    assert run_in(env, "python", "main.py").returncode == 7
    # One request for the good wheel (the prefetch's: uv did not download it), two for the tampered one, and
    # one for each bundle file.
    assert https_files.hits == {good: 1, tampered: 2, "rawvm-env.toml": 1, "pylock.toml": 1, "code.tar.gz": 1}
    assert f"{PREFETCH_DIR}/pylock.prefetched1.toml" in (tmp_path / "state" / "install.log").read_text()
    assert not (tmp_path / "state" / PREFETCH_DIR).exists()  # the wheels went once the install ended
    direct_url = "import importlib.metadata as m; print(m.distribution('tinyone').read_text('direct_url.json'))"
    assert run_in(env, "python", "-c", direct_url).stdout.strip() == "None"  # as from an index, not a path


async def test_a_wheel_whose_hash_the_verified_lock_does_not_name_is_not_used(
    https_files: Served, tmp_path: Path
) -> None:
    """The lock the prefetch reads is not verified yet: a wheel a forged lock had fetched (its own hash) must
    not replace the one the verified lock names at the same URL."""
    wheel = make_wheel(tmp_path / "www", "tinyone", "1.0", {"tinyone.py": ""})
    evil = make_wheel(tmp_path / "evil", "tinyone", "1.0", {"tinyone.py": "EVIL = 1\n"})
    url = f"{https_files.base}/{wheel.name}"
    client = ssl.create_default_context(cafile=str(https_files.ca))
    verified = tmp_path / "pylock.toml"
    verified.write_text(lock_of([(wheel, url)]))

    wheel.rename(tmp_path / "real.whl")
    evil.rename(wheel)  # the server now serves the evil wheel, which the forged lock names by its own hash
    forged = WheelPrefetch(tmp_path / "forged", client)
    assert forged.start(lock_of([(wheel, url)])) == 1
    # in a thread, as the installer calls it: the server here runs on this event loop
    assert await asyncio.to_thread(forged.local_lock, verified, tmp_path / "pylock.forged.toml") == 0
    assert not (tmp_path / "pylock.forged.toml").exists()

    (tmp_path / "real.whl").replace(wheel)  # the real one served: used, as a path
    honest = WheelPrefetch(tmp_path / "honest", client)
    assert honest.start(verified.read_text()) == 1
    assert await asyncio.to_thread(honest.local_lock, verified, tmp_path / "pylock.honest.toml") == 1
    text = (tmp_path / "pylock.honest.toml").read_text()
    assert f'path = "{tmp_path / "honest" / wheel.name}"' in text and "url =" not in text


def test_only_wheels_that_cannot_be_wasted_are_fetched(tmp_path: Path) -> None:
    def package(name: str, size: int, url: str = "", **extra: object) -> dict[str, object]:
        url = url or f"https://files.example/{name}-1.0-py3-none-any.whl"
        wheel = {"url": url, "size": size, "hashes": {"sha256": "A" * 64}}
        return {"name": name, "version": "1.0", "wheels": [wheel], **extra}

    lock = {
        "packages": [
            package("small", 10),
            package("big", 300),
            package("marked", 10, marker="sys_platform == 'win32'"),  # uv may skip it here
            package("plain", 10, url="http://files.example/plain-1.0-py3-none-any.whl"),  # not https
            package("odd", 10, url="https://files.example/download?id=3"),  # not a wheel's file name
            {"name": "two", "wheels": [package("a", 1)["wheels"][0], package("b", 1)["wheels"][0]]},  # uv chooses
            {"name": "sdist", "sdist": {"url": "https://files.example/sdist-1.0.tar.gz"}},
            package("huge", 2000),
        ]
    }
    chosen = wheels_to_fetch(lock, budget=400)
    assert [w.filename for w in chosen] == ["big-1.0-py3-none-any.whl", "small-1.0-py3-none-any.whl"]
    assert chosen[0].sha256 == "a" * 64
    assert is_pylock_name("pylock.toml") and is_pylock_name("locks/pylock.gpu.toml")
    assert not is_pylock_name("pylock.txt") and not is_pylock_name("requirements.toml")


def test_a_warm_uv_cache_fetches_no_wheel(tmp_path: Path) -> None:
    assert uv_cache_is_empty({"UV_CACHE_DIR": str(tmp_path / "missing")})
    (tmp_path / "cache" / "uv").mkdir(parents=True)
    assert uv_cache_is_empty({"UV_CACHE_DIR": str(tmp_path / "cache" / "uv")})
    (tmp_path / "cache" / "uv" / "CACHEDIR.TAG").write_text("")
    assert not uv_cache_is_empty({"UV_CACHE_DIR": str(tmp_path / "cache" / "uv")})
    assert not uv_cache_is_empty({"XDG_CACHE_HOME": str(tmp_path / "cache")})  # uv's own order
    (tmp_path / "home" / ".cache" / "uv").mkdir(parents=True)
    assert uv_cache_is_empty({"HOME": str(tmp_path / "home")})
