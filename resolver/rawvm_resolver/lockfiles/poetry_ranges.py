"""A Poetry project's declared dependencies as PEP 508 lines: what a project without a lock locks from.

Poetry writes ranges in its own syntax (``^1.2``, ``~1.2``, ``1.2.*``, ``>=1 <2``, ``a || b``) and
dependencies as strings or tables (version, extras, markers, platform, git, path, optional); PEP 508 has none
of that, so each is rewritten here. A ``||`` of ranges cannot be one PEP 440 set: such a dependency keeps no
bound (uv then chooses within what the rest allows).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_PLATFORMS = {"darwin": "darwin", "linux": "linux", "win32": "win32", "windows": "win32"}


def poetry_constraint(text: str) -> str:
    """``^1.2.3`` → ``>=1.2.3,<2.0.0``; ``~1.2`` → ``>=1.2,<1.3``; ``1.2`` → ``==1.2``; ``*`` → ``""``."""
    text = text.strip()
    if not text or text == "*" or "||" in text:
        return ""
    parts = [part for part in re.split(r"\s*,\s*|\s+(?=[<>=!~^])", text) if part]
    return ",".join(_one(part.replace(" ", "")) for part in parts)


def _one(part: str) -> str:
    if part.startswith("^"):
        return _caret(part[1:])
    if part.startswith("~") and not part.startswith("~="):
        return _tilde(part[1:])
    if part[0].isdigit():
        return f"=={part}"
    return part


def _numbers(version: str) -> list[int]:
    return [int(piece) for piece in re.findall(r"\d+", version.split("+")[0])[:3]]


def _caret(version: str) -> str:
    numbers = _numbers(version)
    if not numbers:
        return ""
    index = next((i for i, n in enumerate(numbers) if n != 0), len(numbers) - 1)
    upper = [*numbers[:index], numbers[index] + 1]
    return f">={version},<{'.'.join(map(str, upper))}"


def _tilde(version: str) -> str:
    numbers = _numbers(version)
    if not numbers:
        return ""
    upper = [numbers[0] + 1] if len(numbers) == 1 else [numbers[0], numbers[1] + 1]
    return f">={version},<{'.'.join(map(str, upper))}"


def poetry_dependencies(data: dict[str, Any], base_dir: Path) -> list[str]:
    """Requirement lines (pip syntax, ``-e`` for a develop path) for the dependencies ``poetry install`` adds.

    The main dependencies and every group not marked optional (``poetry install`` installs those by default),
    the old ``dev-dependencies`` table included; ``python`` and optional (extras-only) dependencies are left out.
    """
    poetry: dict[str, Any] = data.get("tool", {}).get("poetry", {})
    tables = [poetry.get("dependencies", {}), poetry.get("dev-dependencies", {})]
    for group in poetry.get("group", {}).values():
        if isinstance(group, dict) and not group.get("optional", False):
            tables.append(group.get("dependencies", {}))
    lines: list[str] = []
    for table in tables:
        for name, value in table.items():
            if name.lower() == "python":
                continue
            line = _dependency_line(name, value, base_dir)
            if line:
                lines.append(line)
    return lines


def _dependency_line(name: str, value: Any, base_dir: Path) -> str:
    if isinstance(value, list):  # several constraints by marker: the one for Linux (or without a platform)
        linux = [item for item in value if isinstance(item, dict) and item.get("platform", "linux") == "linux"]
        value = (linux or value or [""])[0]
    if isinstance(value, str):
        return f"{name}{poetry_constraint(value)}"
    if not isinstance(value, dict) or value.get("optional", False):
        return ""
    extras = f"[{','.join(value['extras'])}]" if value.get("extras") else ""
    if "path" in value:
        path = (base_dir / str(value["path"])).resolve()
        return f"-e {path}" if value.get("develop") else f"{name}{extras} @ {path.as_uri()}"
    if "git" in value:
        ref = value.get("rev") or value.get("tag") or value.get("branch") or ""
        subdirectory = f"#subdirectory={value['subdirectory']}" if value.get("subdirectory") else ""
        return f"{name}{extras} @ git+{value['git']}{'@' + ref if ref else ''}{subdirectory}"
    if "url" in value:
        return f"{name}{extras} @ {value['url']}"
    markers = [f"({value['markers']})"] if value.get("markers") else []
    if platform := _PLATFORMS.get(str(value.get("platform", "")).lower()):
        markers.append(f'sys_platform == "{platform}"')
    marker = f" ; {' and '.join(markers)}" if markers else ""
    return f"{name}{extras}{poetry_constraint(str(value.get('version', '')))}{marker}"
