"""Human durations like ``90s``, ``20m``, ``2h``, ``1h30m`` (shared by the agent config and the CLI)."""

from __future__ import annotations

import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


class DurationError(ValueError):
    """A duration string that cannot be read; the message says what is accepted."""


def parse_duration(text: str | int | float) -> float:
    """Seconds in ``text``. Bare numbers are seconds; units are ms, s, m, h, d and may be combined."""
    if isinstance(text, bool):
        raise DurationError(f"invalid duration {text!r}: use e.g. 90s, 20m, 2h")
    if isinstance(text, int | float):
        if text < 0:
            raise DurationError(f"invalid duration {text!r}: must not be negative")
        return float(text)
    compact = text.strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(?:\.\d+)?", compact):
        return float(compact)
    pos, total = 0, 0.0
    for match in _PART.finditer(compact):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(compact) or not compact:
        raise DurationError(f"invalid duration {text!r}: use e.g. 90s, 20m, 2h or 1h30m")
    return total


def format_duration(seconds: float) -> str:
    """Shortest exact rendering that ``parse_duration`` reads back (``1200`` -> ``20m``)."""
    if seconds != int(seconds):
        return f"{seconds:g}s"
    rest, out = int(seconds), ""
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            out += f"{rest // size}{unit}"
            rest %= size
    return out or "0s"
