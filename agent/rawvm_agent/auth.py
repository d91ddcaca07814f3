"""Bearer-token authentication for the agent API: every path but ``/healthz`` needs the token."""

from __future__ import annotations

import hmac

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

PUBLIC_PATHS = frozenset({"/healthz"})


def token_matches(header: str, token: str) -> bool:
    """``Authorization: Bearer <token>``, compared in constant time (no early exit on the first wrong byte)."""
    scheme, _, given = header.partition(" ")
    # Compare even when the scheme is wrong, so timing does not tell the two failures apart.
    same = hmac.compare_digest(given.strip().encode(), token.encode())
    return same and scheme.lower() == "bearer" and bool(token)


def token_middleware(token: str) -> Middleware:
    if not token:
        raise ValueError("the agent API never runs without a token")

    @web.middleware
    async def check_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS:
            return await handler(request)
        if not token_matches(request.headers.get("Authorization", ""), token):
            return web.json_response(
                {"error": "missing or wrong bearer token"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="rawvm-agent"'},
            )
        return await handler(request)

    return check_token
