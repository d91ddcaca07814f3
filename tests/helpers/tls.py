"""A cluster's agent channel for the tests and benches that start agent processes themselves (as a launch
would): the laptop's files, and the agent's certificate, key and CA as agent.toml's ``tls_*`` keys."""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rawvm.agent.tls import ChannelFiles, ServerCredentials, client_context, make_channel, private_dir, write_private
from rawvm_agent.config import AgentConfig


@dataclass(frozen=True)
class Channel:
    laptop: ChannelFiles
    agent: dict[str, str]  # tls_cert, tls_key, tls_ca: paths of the agent's files

    def context(self) -> ssl.SSLContext:
        """The laptop's side: this CA pinned, the client certificate presented."""
        return client_context(self.laptop)


def make_test_channel(root: Path, cluster: str = "test") -> Channel:
    """A fresh channel under ``root`` (``laptop/`` and ``agent/``, 0700; keys 0600)."""
    laptop, server = make_channel(cluster, root / "laptop", 3600)
    directory = private_dir(root / "agent")
    for path, data in server.files(str(directory)):
        write_private(Path(path), data)
    config = ServerCredentials.configure(AgentConfig(), str(directory))
    return Channel(laptop, {"tls_cert": config.tls_cert, "tls_key": config.tls_key, "tls_ca": config.tls_ca})


def secured(config: dict[str, Any], channel: Channel) -> dict[str, Any]:
    """A raw agent.toml dict as rawvm writes one: mutual TLS, and the token only as its sha256."""
    out = {**config, **channel.agent}
    if "token" in out and "token_sha256" not in out:
        out["token_sha256"] = hashlib.sha256(str(out.pop("token")).encode()).hexdigest()
    return out


async def refused(url: str, context: ssl.SSLContext | None, token: str) -> bool:
    """Whether a request with ``token`` at ``url`` (TLS with ``context``; None: no TLS checks) gets no answer."""
    import aiohttp

    try:
        async with aiohttp.ClientSession() as http:
            headers = {"Authorization": f"Bearer {token}"}
            async with http.get(url + "/v1/status", headers=headers, ssl=context or False) as resp:
                await resp.read()
                return False
    except (aiohttp.ClientError, ssl.SSLError, ConnectionError):
        return True


async def strangers_answered(agent_url: str, laptop: ChannelFiles, scratch: Path, token: str) -> list[str]:
    """Which strangers an agent answered (none should be): plain HTTP, TLS pinning the right CA without a client
    certificate, and another cluster's client (its own CA pinned, its certificate presented)."""
    plain = "http://" + agent_url.removeprefix("https://")
    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.check_hostname = False
    no_cert.load_verify_locations(cafile=str(laptop.ca))
    other, _ = make_channel("stranger", scratch / "stranger.tls", 3600)
    tries = {"plain HTTP": (plain, None), "no client certificate": (agent_url, no_cert)}
    tries["another cluster's client"] = (agent_url, client_context(other))
    return [what for what, (url, context) in tries.items() if not await refused(url, context, token)]
