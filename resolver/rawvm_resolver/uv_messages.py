"""Reading uv's messages: whether it found no solution, its explanation on one line, the package names it talks
about, and why a build failed.

Plain text functions, a leaf that resolve.py and relax.py both read uv's answers with.
"""

from __future__ import annotations

import re

from rawvm_resolver.errors import ConflictError

SHORT_LIMIT = 300  # characters of a conflict's line before its suggestion; --explain has the whole text


def is_unsatisfiable(stderr: str) -> bool:
    """uv says the requirements have no solution (as opposed to a failed download or build)."""
    return "No solution found" in stderr or "unsatisfiable" in stderr


def summarise(stderr: str, limit: int = 0) -> str:
    """uv's explanation on one line (cut at ``limit`` characters when given: a build log can run long)."""
    text = " ".join(line.strip(" \u00d7\u2570\u2500\u25b6\u2502") for line in stderr.splitlines() if line.strip())
    text = re.sub(r"\s+", " ", text).removeprefix("error: ")
    text = re.sub(r"No solution found when resolving dependencies:?\s*(cause:\s*)?", "", text).strip()
    return text if not limit or len(text) <= limit else text[: limit - 1] + "…"


def mentioned(stderr: str, names: list[str]) -> list[str]:
    """Names of ``names`` that uv's message talks about, in the order it does."""
    lowered = stderr.lower().replace("_", "-")
    found = []
    for name in names:
        match = re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", lowered)
        if match:
            found.append((match.start(), name))
    return [name for _, name in sorted(found)]


_REQUIREMENT = re.compile(r"(?<![\w.-])([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*(?:==|>=|<=|!=|~=|>|<)")


def named_packages(stderr: str, most: int = 4) -> list[str]:
    """The packages uv's explanation is about, in the order it names them (``tensorflow==2.9.2`` → tensorflow),
    ``Python`` itself left out: what a short line must keep when the explanation is cut."""
    found: list[str] = []
    for match in _REQUIREMENT.finditer(summarise(stderr)):
        name = match.group(1).lower().replace("_", "-")
        if name not in found and name != "python":
            found.append(name)
    return found[:most]


def build_cause(stderr: str, limit: int = 200) -> str:
    """The line of a failed build's output that says why: its last one before uv's hint."""
    output = stderr.split("[stderr]", 1)[-1].split("\nhint:", 1)[0]
    lines = [line.strip() for line in output.splitlines() if line.strip() and not line.strip().startswith("warnings.")]
    cause = lines[-1] if lines else summarise(stderr)
    return cause if len(cause) <= limit else cause[: limit - 1] + "…"


def python_suggestion(stderr: str) -> str:
    """The ``--python`` that would get past a conflict about Python versions, "" when uv's text names none.

    uv says it two ways: wheels only for some ABI tags (``cp38``, ..., ``cp310``: the newest of them), or a
    ``requires-python`` the requested version does not satisfy (``Python>=3.7,<3.11``: the newest below the bound,
    ``Python>=3.13``: that floor)."""
    tags = re.search(r"Python ABI tags: ([^\n]*)", stderr)
    if tags:
        minors = [int(m) for m in re.findall(r"cp3(\d+)", tags.group(1))]
        if minors:
            return f"--python 3.{max(minors)}"
    if "Python" not in stderr or "does not satisfy" not in stderr:
        return ""
    bound = re.search(r"does not satisfy Python\s*[^,\s]*,\s*<\s*3\.(\d+)", stderr)
    if bound and int(bound.group(1)) > 0:
        return f"--python 3.{int(bound.group(1)) - 1}"
    bound = re.search(r"does not satisfy Python\s*<=\s*3\.(\d+)", stderr)
    if bound:
        return f"--python 3.{bound.group(1)}"
    floor = re.search(r"does not satisfy Python\s*>=\s*3\.(\d+)(?![\d.]*\s*,)", stderr)
    if floor:
        return f"--python 3.{floor.group(1)}"
    return ""


def conflict(headline: str, stderr: str, limit: int = SHORT_LIMIT) -> ConflictError:
    """uv's "no solution" as one line of at most ``limit`` characters (``headline: the start of uv's reason``),
    then ``; try --python X`` where the conflict is about Python versions; the whole explanation is the error's
    ``detail``."""
    reason = summarise(stderr)
    detail = f"{headline}: {reason}\n\n{stderr.strip()}"
    line = f"{headline}: {reason}"
    if len(line) > limit:
        names = named_packages(stderr)  # a cut line still says which packages conflict
        about = f"about {', '.join(names)}; " if names else ""
        more = f" ({about}whole text: rawvm lock --explain)"
        line = f"{headline}: {summarise(stderr, max(40, limit - len(headline) - 2 - len(more)))}{more}"
    hint = python_suggestion(stderr)
    return ConflictError(line + (f"; try {hint}" if hint else ""), detail)
