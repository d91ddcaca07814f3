"""Strict parsing of the agent API's numeric query parameters, shared by every handler module.

``int()`` and ``float()`` take far more than an HTTP client should send: surrounding spaces, ``_`` separators,
``+``, and any Unicode digit (``int("١٢")`` is 12). ``str.isdigit()`` is looser still: ``"²".isdigit()`` is True
but ``int("²")`` fails, which once made ``?after=²`` a 500. Here a value is ASCII digits matched whole with
``re.fullmatch`` before any conversion, and anything else is a one-line JSON 400.
"""

from __future__ import annotations

import json
import math
import re

from aiohttp import web

MAX_INT_PARAM = 1 << 53  # offsets and sequence numbers beyond this are nonsense (and beyond what seek takes)
_INTEGER = re.compile(r"-?[0-9]{1,16}")
# What Python's str(float) writes for a non-negative number: 5, 5.0, 0.25, 1e-05.
_NUMBER = re.compile(r"[0-9]{1,16}(\.[0-9]{1,16})?([eE][-+]?[0-9]{1,3})?")


def bad_request(message: str) -> web.HTTPBadRequest:
    """A 400 whose body is one line of JSON (the handlers' error shape)."""
    return web.HTTPBadRequest(text=json.dumps({"error": message}), content_type="application/json")


def int_param(request: web.Request, name: str, default: int, minimum: int = 0, maximum: int = MAX_INT_PARAM) -> int:
    """The query's ``name`` as an integer in [minimum, maximum]; ``default`` when absent or empty."""
    raw = request.query.get(name, "")
    if raw == "":
        return default
    if not _INTEGER.fullmatch(raw):
        raise bad_request(f"'{name}' must be an integer")
    value = int(raw)
    if not minimum <= value <= maximum:
        raise bad_request(f"'{name}' must be between {minimum} and {maximum}")
    return value


def number_param(request: web.Request, name: str, default: float) -> float:
    """The query's ``name`` as a finite number >= 0; ``default`` when absent or empty."""
    raw = request.query.get(name, "")
    if raw == "":
        return default
    value = float(raw) if _NUMBER.fullmatch(raw) else math.nan
    if not math.isfinite(value):
        raise bad_request(f"{name!r} must be a number >= 0")
    return value
