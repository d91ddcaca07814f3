"""Reading uv's messages: whether it found no solution, its explanation on one line, the package names it talks
about, and why a build failed.

Plain text functions, a leaf that resolve.py and relax.py both read uv's answers with.
"""

from __future__ import annotations

import re


def is_unsatisfiable(stderr: str) -> bool:
    """uv says the requirements have no solution (as opposed to a failed download or build)."""
    return "No solution found" in stderr or "unsatisfiable" in stderr


def summarise(stderr: str, limit: int = 0) -> str:
    """uv's explanation on one line (cut at ``limit`` characters when given: a build log can run long)."""
    text = " ".join(line.strip(" \u00d7\u2570\u2500\u25b6\u2502") for line in stderr.splitlines() if line.strip())
    text = re.sub(r"\s+", " ", text).replace("No solution found when resolving dependencies: ", "")
    text = text.removeprefix("error: ").strip()
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


def build_cause(stderr: str, limit: int = 200) -> str:
    """The line of a failed build's output that says why: its last one before uv's hint."""
    output = stderr.split("[stderr]", 1)[-1].split("\nhint:", 1)[0]
    lines = [line.strip() for line in output.splitlines() if line.strip() and not line.strip().startswith("warnings.")]
    cause = lines[-1] if lines else summarise(stderr)
    return cause if len(cause) <= limit else cause[: limit - 1] + "…"
