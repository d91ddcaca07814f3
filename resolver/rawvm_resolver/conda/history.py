"""The specs a user asked for, read from ``conda-meta/history`` the way conda's own History does."""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Iterable

_SPECS_LINE = re.compile(r"#\s*(?P<action>\w+) specs:\s*(?P<specs>.*)")
_ADDS = frozenset({"update", "install", "create", "neutered"})
_REMOVES = frozenset({"remove", "uninstall"})


def _parse_specs(text: str) -> list[str]:
    # conda writes a Python list repr; older versions wrote a comma-separated list.
    text = text.strip()
    if text.startswith("["):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return []
        return [str(item) for item in value] if isinstance(value, list) else []
    return [part.strip() for part in text.split(",") if part.strip()]


def requested_specs(lines: Iterable[str], name_of: Callable[[str], str]) -> list[str]:
    """The requested specs left after replaying every install/update/remove, in first-request order.

    ``name_of`` maps a spec to its package name, so ``numpy`` then ``numpy>=2`` keeps only the second.
    """
    by_name: dict[str, str] = {}
    for line in lines:
        match = _SPECS_LINE.match(line.strip())
        if match is None:
            continue
        action = match["action"]
        for spec in _parse_specs(match["specs"]):
            name = name_of(spec)
            if action in _ADDS:
                by_name[name] = spec
            elif action in _REMOVES:
                by_name.pop(name, None)
    return list(by_name.values())
