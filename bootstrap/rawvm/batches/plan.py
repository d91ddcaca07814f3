"""What a batch is before anything launches: its task ids and values, its spec, and script header options.

Each check gives one line naming the flag (a UsageError), before any lock or launch.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Sequence
from pathlib import Path

from rawvm_agent.batch import BatchSpec

from rawvm.errors import UsageError

MAX_TASKS = 1_000_000
HEADER = re.compile(r"^\s*#\s*rawvm:(.*)$")
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_array(text: str) -> list[int]:
    """``0-999`` or ``1,4-6``: the ids, in order, each once."""
    ids: list[int] = []
    for part in text.split(","):
        match = _RANGE.match(part.strip())
        if not match:
            raise UsageError(f"--array {text!r}: use ids and ranges like 0-999 or 1,4-6")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise UsageError(f"--array {text!r}: the range {part.strip()} runs backwards")
        if len(ids) + high - low + 1 > MAX_TASKS:
            raise UsageError(f"--array {text!r}: more than {MAX_TASKS} tasks")
        ids.extend(range(low, high + 1))
    if len(set(ids)) != len(ids):
        raise UsageError(f"--array {text!r}: an id appears twice")
    return ids


def read_values_file(path: str | Path) -> list[str]:
    """One value per non-empty line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--map-over-file {path}: cannot read it ({exc})") from None
    values = [line.strip() for line in lines if line.strip()]
    if not values:
        raise UsageError(f"--map-over-file {path}: no values in it (one per line)")
    return values


def parse_values(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",")]
    if not all(values):
        raise UsageError(f"--map-over-values {text!r}: an empty value (use a,b,c)")
    return values


def tasks_of(
    array: str | None, map_over_file: str | Path | None, map_over_values: str | Sequence[str] | None
) -> tuple[list[int], list[str] | None]:
    """The ids and (for a map) the values; a map numbers its values from 0."""
    given = [x for x in (array, map_over_file, map_over_values) if x is not None]
    if len(given) != 1:
        raise UsageError("give exactly one of --array, --map-over-file, --map-over-values")
    if array is not None:
        return parse_array(array), None
    if map_over_file is not None:
        values = read_values_file(map_over_file)
    elif isinstance(map_over_values, str):
        values = parse_values(map_over_values)
    else:
        values = [str(v) for v in map_over_values or []]
        if not values:
            raise UsageError("--map-over-values: no values")
    return list(range(len(values))), values


def machines_needed(count: int, n: int, tasks_per_machine: int) -> int:
    """As many machines as the tasks can use, at most ``n``: K per machine when K is known, else one each."""
    per = tasks_per_machine or 1
    return max(1, min(n, math.ceil(count / per)))


def make_spec(
    argv: Sequence[str],
    ids: list[int],
    values: list[str] | None,
    *,
    machines: int,
    tasks_per_machine: int,
    max_retries: int,
    task_timeout_s: float,
    gpu: bool,
) -> BatchSpec:
    if tasks_per_machine < 0:
        raise UsageError("--tasks-per-machine must not be negative (0: the machine's cores)")
    if max_retries < 0:
        raise UsageError("--max-retries must not be negative")
    return BatchSpec(
        argv=list(argv),
        ids=ids,
        values=values,
        machines=machines,
        tasks_per_machine=tasks_per_machine,
        max_retries=max_retries,
        task_timeout=task_timeout_s,
        gpu=gpu,
    )


def script_of(argv: Sequence[str], cwd: Path | None = None) -> Path | None:
    """The script a command runs: the first argument that is a file here (``python job.py``, ``./run.sh``)."""
    base = cwd or Path.cwd()
    for arg in argv[:3]:
        if arg.startswith("-"):
            continue
        path = Path(arg) if Path(arg).is_absolute() else base / arg
        if path.is_file() and path.suffix not in {".exe"} and path.stat().st_size < 1 << 20:
            return path
    return None


def header_options(argv: Sequence[str], cwd: Path | None = None) -> list[str]:
    """Options from ``# rawvm: --gpu -n 10`` lines at the top of the command's script (before its first code
    line), as Coiled reads ``#COILED`` lines; explicit flags win over them."""
    script = script_of(argv, cwd)
    if script is None:
        return []
    try:
        lines = script.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    options: list[str] = []
    for line in lines:
        if match := HEADER.match(line):
            try:
                options += shlex.split(match.group(1))
            except ValueError as exc:
                raise UsageError(f"{script}: bad '# rawvm:' line {line.strip()!r}: {exc}") from None
        elif line.strip() and not line.lstrip().startswith("#"):
            break
    return options


def compress_ids(ids: Sequence[int]) -> str:
    """``1,4-6,9``: ids for a message, ranges folded."""
    out: list[str] = []
    ordered = sorted(ids)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)
