"""Spot interruption notices from the instance metadata service, IMDSv2 only.

Every ``poll`` seconds: ``GET /latest/meta-data/spot/instance-action`` with a session token obtained by
``PUT /latest/api/token``. 404 means no notice; 200 carries the notice (JSON text, e.g.
``{"action": "terminate", "time": "2026-11-24T22:00:00Z"}``), handed once to ``on_notice``. The token is
renewed before it expires and whenever IMDS answers 401. A request without a token (IMDSv1) is never made.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp

from rawvm_agent.config import SpotConfig

log = logging.getLogger(__name__)

TOKEN_PATH = "/latest/api/token"  # noqa: S105 (a URL path, not a secret)
NOTICE_PATH = "/latest/meta-data/spot/instance-action"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"  # noqa: S105 (a header name)
TOKEN_TTL = 21600  # seconds, IMDS's maximum
REQUEST_TIMEOUT = 2.0  # IMDS is link-local: an answer takes milliseconds or is not coming


class _TokenRejected(Exception):
    """IMDS answered 401: the token expired or was never valid."""


class _Imds:
    def __init__(self, session: aiohttp.ClientSession, base_url: str, token_ttl: int) -> None:
        self._session = session
        self._base = base_url.rstrip("/")
        self._ttl = token_ttl
        self._token = ""
        self._renew_at = 0.0

    async def _fresh_token(self) -> str:
        if not self._token or time.monotonic() >= self._renew_at:
            async with self._session.put(self._base + TOKEN_PATH, headers={TTL_HEADER: str(self._ttl)}) as response:
                response.raise_for_status()
                self._token = (await response.text()).strip()
            # Renew well before expiry so a token is never used at the edge of its life.
            self._renew_at = time.monotonic() + self._ttl - min(60.0, self._ttl / 2)
        return self._token

    async def instance_action(self) -> str | None:
        """The notice text, or None when there is none."""
        for attempt in range(2):
            token = await self._fresh_token()
            async with self._session.get(self._base + NOTICE_PATH, headers={TOKEN_HEADER: token}) as response:
                if response.status == 404:
                    return None
                if response.status == 401:
                    self._token = ""  # expired early (IMDS restarted, clock jump): get a new one, once
                    if attempt == 0:
                        continue
                    raise _TokenRejected("IMDS rejected a fresh token")
                response.raise_for_status()
                return await response.text()
        return None


async def watch_spot(
    config: SpotConfig, on_notice: Callable[[str], Awaitable[None]], *, token_ttl: int = TOKEN_TTL
) -> None:
    """Poll until a notice arrives, call ``on_notice(text)`` once, return. Returns at once when disabled.

    IMDS errors are logged (once per kind of error in a row) and polling goes on: a flaky metadata
    service must not kill the agent.
    """
    if not config.enabled:
        return
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    last_error = ""
    async with aiohttp.ClientSession(timeout=timeout) as session:
        imds = _Imds(session, config.imds_url, token_ttl)
        while True:
            try:
                notice = await imds.instance_action()
            except (aiohttp.ClientError, TimeoutError, _TokenRejected) as exc:
                error = f"{type(exc).__name__}: {exc}"
                if error != last_error:
                    log.warning("spot: IMDS at %s: %s (still polling)", config.imds_url, error)
                last_error = error
            else:
                last_error = ""
                if notice is not None:
                    log.warning("spot: interruption notice: %s", notice.strip())
                    await on_notice(notice)
                    return
            await asyncio.sleep(config.poll)
