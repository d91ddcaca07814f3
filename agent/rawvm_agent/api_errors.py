"""Every error the agent API answers is one line of JSON, ``{"error": "..."}``.

aiohttp's own errors (no such route, method not allowed, body too large, a bad query) are plain text; this
middleware, outermost, turns them into the same JSON shape the handlers use. An unexpected exception in a
handler is logged with its traceback and answered 500 with a one-line message, never the traceback.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

log = logging.getLogger("rawvm_agent.api")

# Headers of an aiohttp error worth keeping on the JSON answer (405's Allow, 401's challenge).
_KEPT_HEADERS = ("Allow", "WWW-Authenticate", "Retry-After")


def one_line(text: str, limit: int = 300) -> str:
    return " ".join(text.split())[:limit]


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        message = one_line(exc.text or exc.reason or "") or exc.reason
        # aiohttp prefixes its texts with the status ("404: Not Found"); the status line says that already.
        message = message.removeprefix(f"{exc.status}: ")
        headers = {k: exc.headers[k] for k in _KEPT_HEADERS if k in exc.headers}
        return web.json_response({"error": message}, status=exc.status, headers=headers)
    except (ConnectionError, TimeoutError):
        raise  # the client went away mid-answer: nothing to tell it
    except Exception as exc:
        log.exception("API %s %s failed", request.method, request.path)
        return web.json_response({"error": one_line(f"internal error: {type(exc).__name__}")}, status=500)
