"""10 000 tiny ``f.map`` calls: ``@rawvm.function`` against ``concurrent.futures.ProcessPoolExecutor.map``.

    uv run python bench/batch_map.py [--calls 10000] [-n 1] [--repeat 3]

Both run the same function (``x + 1``, from a module of a temporary project) on this machine with the same
number of worker processes (the cores): rawvm on ``-n`` local machines (agent processes here, one call worker
per core each, reached over loopback HTTP), the baseline in a process pool. The baseline runs with its default
``chunksize=1`` (what ``pool.map(f, items)`` does) and with ``chunksize=100`` (tuned by hand); rawvm batches
by itself. rawvm's figure is warm: the machines are up (the first call launches them, timed apart as "cold").
Each figure is the median of ``--repeat`` runs. Needs PyPI (the machines install their locked environment).
``measure()`` returns the figures for bench/batch.py to print with its own.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODULE = """\
import rawvm


def tiny(x):
    return x + 1


def remote(n):
    return rawvm.function(n=n, keepalive="30s", source="requirements.txt")(tiny)
"""


def timed(run: Callable[[], list[Any]], expected: list[int], repeat: int) -> float:
    """Median seconds of ``repeat`` runs, each checked against ``expected``."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - started)
        if result != expected:
            raise SystemExit("wrong results")
    return statistics.median(times)


@dataclass(frozen=True)
class MapFigures:
    calls: int
    machines: int
    workers: int
    repeat: int
    rawvm_s: float  # warm: the machines were up
    pool_s: float  # ProcessPoolExecutor.map, chunksize=1
    tuned_s: float  # ProcessPoolExecutor.map, chunksize=100
    cold_s: float  # the first call: lock, launch, install, workers

    def report(self) -> str:
        def rate(seconds: float) -> float:
            return self.calls / seconds

        plural = "s" if self.machines > 1 else ""
        return "\n".join(
            [
                f"{self.calls} calls of x + 1, {self.workers} worker processes, median of {self.repeat} runs",
                f"  rawvm f.map ({self.machines} local machine{plural}, warm): {rate(self.rawvm_s):9.0f} calls/s",
                f"  ProcessPoolExecutor.map (chunksize=1):     {rate(self.pool_s):9.0f} calls/s",
                f"  ProcessPoolExecutor.map (chunksize=100):   {rate(self.tuned_s):9.0f} calls/s",
                f"  ratio rawvm / ProcessPoolExecutor: {self.pool_s / self.rawvm_s:.2f}x (chunksize=1), "
                f"{self.tuned_s / self.rawvm_s:.2f}x (100)",
                f"  first call, launching the machine{plural} (lock, install, workers): {self.cold_s:.1f} s",
                f"  load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())}",
            ]
        )


def measure(calls: int = 10_000, machines: int = 1, repeat: int = 3) -> MapFigures:
    """Both sides, side by side; for bench/batch.py to import as well."""
    cores = os.cpu_count() or 1
    items = list(range(calls))
    expected = [x + 1 for x in items]
    here, saved_path, saved_state = Path.cwd(), list(sys.path), os.environ.get("RAWVM_STATE_DIR")
    with tempfile.TemporaryDirectory(prefix="rawvm-bench-map-") as scratch:
        root = Path(scratch) / "project"
        root.mkdir()
        (root / "requirements.txt").write_text("six\n")
        (root / "benchwork.py").write_text(MODULE)
        os.chdir(root)
        os.environ["RAWVM_STATE_DIR"] = str(Path(scratch) / "state")
        sys.path.insert(0, str(root))
        try:
            work = importlib.import_module("benchwork")
            from rawvm import api, clusters

            remote = work.remote(machines)
            started = time.perf_counter()
            assert remote.map([1, 2]) == [2, 3]
            cold = time.perf_counter() - started
            try:
                rawvm_s = timed(lambda: remote.map(items), expected, repeat)
            finally:
                for record in clusters.all_records():
                    api.down(record.name)
            with concurrent.futures.ProcessPoolExecutor(max_workers=cores) as pool:
                list(pool.map(work.tiny, range(cores * 4)))  # workers started before the clock, as rawvm's are
                pool_s = timed(lambda: list(pool.map(work.tiny, items)), expected, repeat)
                tuned_s = timed(lambda: list(pool.map(work.tiny, items, chunksize=100)), expected, repeat)
        finally:
            os.chdir(here)
            sys.path[:] = saved_path
            sys.modules.pop("benchwork", None)
            if saved_state is None:
                os.environ.pop("RAWVM_STATE_DIR", None)
            else:
                os.environ["RAWVM_STATE_DIR"] = saved_state
    return MapFigures(calls, machines, cores, repeat, rawvm_s, pool_s, tuned_s, cold)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("-n", type=int, default=1, help="local machines for rawvm")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(measure(args.calls, args.n, args.repeat).report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
