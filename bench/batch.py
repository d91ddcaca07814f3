"""Many tiny tasks: what rawvm adds per task, against the plainest way to run them here.

    uv run python bench/batch.py [--tasks 1000] [--machines 4] [--per-machine 2]

Sections (each a function returning its report lines; run in order):

1. ``batch_array``: ``rawvm batch run --array 0-(N-1)`` of a no-op command (``true``) over M local machines,
   K at a time on each, against ``xargs -P M*K`` of the same command on this machine, same total concurrency.
   Per-task time is the wall time of the task phase divided by N. For rawvm the task phase is read from the
   agents' own results (first attempt started → last ended, every machine), so it holds scheduling, process
   start in the machine's environment, output capture, result files and the incremental sink flushes, and not
   the launch, which is reported apart (lock + boot + install, once per batch). The baseline is xargs spawning
   ``true`` with nothing around it: the ratio is rawvm's per-task overhead over a bare fork/exec.
2. ``function_map``: 10 000 tiny ``f.map`` calls of ``@rawvm.function`` against
   ``concurrent.futures.ProcessPoolExecutor.map`` of the same function (``bench/batch_map.py``, also runnable alone).

Local machines share this host's cores, so both sides compete for the same CPUs; on a 2-core machine shared
with other work the absolute figures move from run to run, the ratio less.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rawvm_agent.batch_results import read_results

REPO = Path(__file__).resolve().parent.parent


def _xargs(tasks: int, parallel: int) -> float:
    started = time.perf_counter()
    subprocess.run(
        ["xargs", "-P", str(parallel), "-n", "1", "sh", "-c", "true"],
        input="\n".join(map(str, range(tasks))),
        text=True,
        check=True,
    )
    return time.perf_counter() - started


def _rawvm_batch(tasks: int, machines: int, per_machine: int, scratch: Path) -> dict[str, float]:
    project, tmp, state = scratch / "project", scratch / "tmp", scratch / "state"
    for directory in (project, tmp, state):
        directory.mkdir()
    (project / "requirements.txt").write_text("")
    env = {**os.environ, "RAWVM_STATE_DIR": str(state), "TMPDIR": str(tmp)}
    command = [sys.executable, "-m", "rawvm.cli", "batch", "run", "--array", f"0-{tasks - 1}", "-n", str(machines)]
    command += ["--tasks-per-machine", str(per_machine), "--keepalive", "5s", "--from", "requirements.txt"]
    command += ["--max-retries", "0", "--", "sh", "-c", "true"]
    started = time.perf_counter()
    run = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=1800)
    total = time.perf_counter() - started
    if run.returncode != 0:
        raise SystemExit(f"rawvm batch run failed ({run.returncode}):\n{run.stderr}")
    cluster = run.stdout.strip()
    by_id: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + 60  # the machines flush their last results within a second or so
    while len(by_id) < tasks and time.monotonic() < deadline:
        time.sleep(0.5)
        for flush in (state / "sinks" / cluster).glob(f"{cluster}-*/batch/results"):
            for result in read_results(flush):
                by_id[result["id"]] = result
    if sorted(by_id) != list(range(tasks)) or any(r["state"] != "done" for r in by_id.values()):
        raise SystemExit(f"rawvm batch: {len(by_id)} results of {tasks}, not all done")
    first = min(a["started_at"] for r in by_id.values() for a in r["attempts"])
    last = max(a["ended_at"] for r in by_id.values() for a in r["attempts"])
    return {"total": total, "tasks": last - first}


def batch_array(args: argparse.Namespace) -> list[str]:
    parallel = args.machines * args.per_machine
    with tempfile.TemporaryDirectory(prefix="rawvm-bench-batch-", ignore_cleanup_errors=True) as scratch:
        rawvm = _rawvm_batch(args.tasks, args.machines, args.per_machine, Path(scratch))
        time.sleep(8)  # the machines' keepalive (5s): they stop and leave the directory
    baseline = _xargs(args.tasks, parallel)
    ours, theirs = rawvm["tasks"] / args.tasks * 1000, baseline / args.tasks * 1000
    return [
        f"batch array: {args.tasks} no-op tasks, {args.machines} local machines x {args.per_machine} "
        f"= xargs -P {parallel}",
        f"  xargs -P {parallel}:            {baseline:7.2f} s  {theirs:7.2f} ms/task",
        f"  rawvm batch run (task phase): {rawvm['tasks']:7.2f} s  {ours:7.2f} ms/task  ({ours / theirs:.1f}x xargs)",
        f"  rawvm batch run, end to end:  {rawvm['total']:7.2f} s  (lock, launch, boot, install, tasks, results)",
        f"  per-task overhead over xargs: {ours - theirs:.2f} ms",
        f"  load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())}",
    ]


def function_map(args: argparse.Namespace) -> list[str]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import batch_map

    return [batch_map.measure(calls=args.calls, machines=1, repeat=3).report()]


# Each section: (name, function), run in order.
SECTIONS: list[tuple[str, Callable[[argparse.Namespace], list[str]]]] = [
    ("batch array", batch_array),
    ("function map", function_map),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--machines", type=int, default=4)
    parser.add_argument("--per-machine", type=int, default=2, help="K concurrent tasks per machine")
    parser.add_argument("--calls", type=int, default=10_000, help="f.map calls in the function section")
    parser.add_argument("--only", default="", help="run one section by name")
    args = parser.parse_args()
    for name, section in SECTIONS:
        if not args.only or args.only == name:
            print("\n".join(section(args)), flush=True)


if __name__ == "__main__":
    main()
