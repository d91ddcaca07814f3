"""Security rules of the agent: token on every route but /healthz, constant-time compare, TLS, redaction."""

from __future__ import annotations

import logging
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from rawvm_agent.app import Agent
from rawvm_agent.auth import digest, token_matches, token_middleware
from rawvm_agent.config import config_from_dict
from rawvm_agent.logs import MASK, RedactingFormatter, Redactor, setup_logging, url_password
from rawvm_agent.server import create_app, server_ssl_context

from tests.agent.core_helpers import TOKEN, agent_config
from tests.helpers.tls import make_test_channel, secured

ROUTES = [
    ("GET", "/metrics"),
    ("GET", "/v1/status"),
    ("GET", "/v1/samples"),
    ("GET", "/v1/tasks"),
    ("POST", "/v1/tasks"),
    ("GET", "/v1/tasks/abc"),
    ("GET", "/v1/tasks/abc/logs"),
    ("POST", "/v1/keepalive"),
    ("POST", "/v1/shutdown"),
    ("GET", "/v1/shell"),  # the websockets of rawvm shell, cp, forward (interactive_api.py)
    ("GET", "/v1/files"),
    ("GET", "/v1/forward"),
    ("GET", "/v1/sync"),  # rawvm notebook (sync_api.py)
    ("GET", "/no/such/route"),
]
BAD_HEADERS: list[dict[str, str]] = [
    {},
    {"Authorization": "Bearer wrong-token"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": f"Bearer {TOKEN[:-1]}"},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": "Bearer "},
    {"Authorization": TOKEN},
    {"X-Token": TOKEN},
]


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[tuple[Agent, TestClient[Any, Any]]]:
    agent = Agent(config_from_dict(agent_config(tmp_path / "state")))
    async with TestClient(TestServer(create_app(agent))) as test_client:
        yield agent, test_client


async def test_every_route_but_healthz_needs_the_token(client: tuple[Agent, TestClient[Any, Any]]) -> None:
    agent, http = client
    for method, path in ROUTES:
        for headers in BAD_HEADERS:
            resp = await http.request(method, f"{path}?token={TOKEN}", headers=headers, json={"argv": ["true"]})
            assert resp.status == 401, (method, path, headers)
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            assert TOKEN not in await resp.text()
    # None of those requests did anything.
    assert agent.tasks.tasks == {}
    assert agent.state.last_keepalive is None
    assert agent.state.phase not in ("stopping", "off")
    resp = await http.get("/healthz")
    assert resp.status == 200 and await resp.text() == "ok"
    resp = await http.get("/v1/status", headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status == 200
    resp = await http.get("/v1/status", headers={"Authorization": f"bearer {TOKEN}"})
    assert resp.status == 200  # the scheme is case-insensitive (RFC 7235)


def test_token_matches() -> None:
    assert token_matches(f"Bearer {TOKEN}", digest(TOKEN))
    assert not token_matches(f"Bearer {TOKEN}", b"")
    assert not token_matches("Bearer ", b"")
    assert not token_matches("", digest(TOKEN))
    assert not token_matches(f"Token {TOKEN}", digest(TOKEN))


def test_no_token_no_api() -> None:
    with pytest.raises(ValueError, match="token"):
        token_middleware(b"")
    with pytest.raises(ValueError, match="token"):
        Agent(config_from_dict({**agent_config(Path("/tmp/unused")), "token": ""}))


def test_redactor_masks_every_secret_longest_first() -> None:
    redactor = Redactor(["abcd1234", "abcd1234-longer", "xy"])
    assert redactor.redact("a abcd1234-longer b abcd1234 c xy") == f"a {MASK} b {MASK} c xy"  # "xy": too short


def test_url_password() -> None:
    assert url_password("https://user:p4ss-w0rd@mirror.example/simple") == "p4ss-w0rd"
    assert url_password("https://mirror.example/simple") == ""


def test_formatter_masks_messages_arguments_and_tracebacks() -> None:
    redactor = Redactor(["s3cret-value"])
    formatter = RedactingFormatter(redactor, "%(message)s")
    try:
        raise RuntimeError("boom s3cret-value")
    except RuntimeError:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "token %s", ("s3cret-value",), sys.exc_info())
    text = formatter.format(record)
    assert "s3cret-value" not in text
    assert text.startswith(f"token {MASK}\n") and text.endswith(f"RuntimeError: boom {MASK}")


def test_setup_logging_redacts_file_and_stderr(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    redactor = Redactor([TOKEN])
    log_file = tmp_path / "agent.log"
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        setup_logging(redactor, log_file)
        logging.getLogger("rawvm_agent.x").warning("token is %s", TOKEN)
        redactor.add("added-later-secret")
        logging.getLogger("rawvm_agent.y").warning("also added-later-secret")
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
    err = capfd.readouterr().err
    text = log_file.read_text()
    for out in (err, text):
        assert TOKEN not in out and "added-later-secret" not in out
        assert out.count(MASK) == 2


async def test_the_api_serves_only_mutual_tls_with_the_cluster_ca(tmp_path: Path) -> None:
    channel = make_test_channel(tmp_path / "tls")
    config = config_from_dict(secured(agent_config(tmp_path / "state"), channel))
    runner = web.AppRunner(create_app(Agent(config)))
    await runner.setup()
    try:
        await web.TCPSite(runner, config.bind, config.port, ssl_context=server_ssl_context(config)).start()
        url = f"https://127.0.0.1:{config.port}"
        async with aiohttp.ClientSession() as session:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with session.get(f"{url}/v1/status", ssl=channel.context(), headers=headers) as resp:
                assert resp.status == 200  # the token checked against its sha256
            with pytest.raises(aiohttp.ClientError):
                async with session.get(f"http://127.0.0.1:{config.port}/healthz") as resp:
                    await resp.read()
            no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            no_cert.check_hostname = False
            no_cert.load_verify_locations(cafile=str(channel.laptop.ca))
            with pytest.raises(aiohttp.ClientError):
                async with session.get(f"{url}/healthz", ssl=no_cert) as resp:
                    await resp.read()  # TLS, but no client certificate
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                async with session.get(f"{url}/healthz") as resp:
                    await resp.read()  # the system store does not know the cluster CA
    finally:
        await runner.cleanup()


def test_an_agent_without_tls_refuses_to_start_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'token = "{TOKEN}"\nstate_dir = "{tmp_path / "state"}"\ntls_cert = "/x/cert.pem"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "rawvm_agent", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "mutual TLS" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(ValueError, match="mutual TLS"):
        server_ssl_context(config_from_dict(agent_config(tmp_path)))
