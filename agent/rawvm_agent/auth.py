"""Bearer-token authentication for the agent API: every path but ``/healthz`` needs the token.

The agent knows only the token's sha256 (``token_sha256`` in agent.toml): it hashes what a request presents and
compares the digests in constant time, so neither agent.toml nor the user-data holds anything that opens the API.
The call workers on the machine get a token of their own, minted by the agent at start and never written, which
opens only the workers' path.
"""

from __future__ import annotations

import hashlib
import hmac

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

PUBLIC_PATHS = frozenset({"/healthz"})


def digest(token: str) -> bytes:
    """The sha256 a token is known by."""
    return hashlib.sha256(token.encode()).digest()


def token_matches(header: str, token_sha256: bytes) -> bool:
    """``Authorization: Bearer <token>`` whose sha256 is ``token_sha256``, compared in constant time."""
    scheme, _, given = header.partition(" ")
    # Compare even when the scheme is wrong, so timing does not tell the two failures apart.
    same = hmac.compare_digest(digest(given.strip()), token_sha256)
    return same and scheme.lower() == "bearer" and bool(token_sha256)


def token_middleware(token_sha256: bytes, *, worker: tuple[str, bytes] | None = None) -> Middleware:
    """Requests need the token of ``token_sha256``; ``worker`` = (path, sha256) admits another token on that path
    alone (the call workers' local token)."""
    if not token_sha256:
        raise ValueError("the agent API never runs without a token")

    @web.middleware
    async def check_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS:
            return await handler(request)
        header = request.headers.get("Authorization", "")
        allowed = token_matches(header, token_sha256)
        if worker is not None and request.path == worker[0]:
            allowed = token_matches(header, worker[1]) or allowed
        if not allowed:
            return web.json_response(
                {"error": "missing or wrong bearer token"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="rawvm-agent"'},
            )
        return await handler(request)

    return check_token
