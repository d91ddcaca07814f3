"""A Dask groupby on 3 local machines through ``rawvm.dask_cluster`` against ``distributed.LocalCluster`` with the
same worker count, side by side in one run.

    uv run python bench/dask.py [--workers 3] [--rows 200000] [--parts 8]

Both compute the same ``dask.dataframe`` groupby (sum, count, mean per key) over the same generated parquet files
and check the result against pandas'. Two times each:

- ready: from the call that makes the cluster to ``Client.wait_for_workers(n)`` returning. rawvm's includes the
  lock of this environment, the machines' installs of it (uv, warm cache) and TLS; LocalCluster's is starting
  worker processes of this very environment, over plain TCP. This is the price of running in machines of one's
  own environment rather than in this process's.
- result: the groupby's ``compute()`` on the ready cluster (every rawvm connection is TLS).

A third row, LocalCluster over TLS (``Security.temporary()``), separates what TLS costs from what separate
machines cost. Ratios are rawvm / LocalCluster and rawvm / LocalCluster with TLS. Every worker has a thread per
core, as rawvm's do. On a shared 2-core machine all of them fight for the same cores (and with whatever else runs):
the absolute times say little, and a run beside other load says less.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# This file is named dask.py: its own directory must not shadow the dask package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def make_data(directory: Path, rows: int, parts: int) -> list[str]:
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    for part in range(parts):
        frame = pd.DataFrame({"key": rng.integers(0, 1000, rows), "value": rng.random(rows)})
        frame.to_parquet(directory / f"part-{part}.parquet")
    return sorted(str(p) for p in directory.glob("*.parquet"))


def groupby(files: list[str]) -> object:
    import dask.dataframe as dd

    return dd.read_parquet(files).groupby("key")["value"].agg(["sum", "count", "mean"]).compute()


def timed(make_cluster: object, workers: int, files: list[str], repeats: int) -> tuple[float, list[float], object]:
    from distributed import Client

    start = time.perf_counter()
    cluster = make_cluster()  # type: ignore[operator]
    with Client(cluster) as client:
        client.wait_for_workers(workers, timeout=600)
        ready = time.perf_counter() - start
        results = []
        answer = None
        for _ in range(repeats):
            mark = time.perf_counter()
            answer = groupby(files)
            results.append(time.perf_counter() - mark)
    cluster.close()
    return ready, results, answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--rows", type=int, default=200_000, help="rows per parquet file")
    parser.add_argument("--parts", type=int, default=8, help="parquet files")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import pandas as pd
    import rawvm
    from distributed import LocalCluster, Security

    with tempfile.TemporaryDirectory(prefix="rawvm-bench-dask-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        files = make_data(data, args.rows, args.parts)
        expected = pd.concat(pd.read_parquet(f) for f in files).groupby("key")["value"].agg(["sum", "count", "mean"])
        os.environ.setdefault("RAWVM_STATE_DIR", str(Path(tmp) / "state"))

        threads = os.cpu_count() or 1  # rawvm gives each worker a thread per core of its machine: so does this
        local_ready, local_times, local_answer = timed(
            lambda: LocalCluster(
                n_workers=args.workers, threads_per_worker=threads, processes=True, dashboard_address=":0"
            ),
            args.workers,
            files,
            args.repeats,
        )
        tls_ready, tls_times, tls_answer = timed(
            lambda: LocalCluster(
                n_workers=args.workers,
                threads_per_worker=threads,
                processes=True,
                dashboard_address=":0",
                protocol="tls",
                security=Security.temporary(),
            ),
            args.workers,
            files,
            args.repeats,
        )
        rawvm_ready, rawvm_times, rawvm_answer = timed(
            lambda: rawvm.dask_cluster(args.workers, keepalive="2m"), args.workers, files, args.repeats
        )
        for answer in (local_answer, tls_answer, rawvm_answer):
            pd.testing.assert_frame_equal(answer.sort_index(), expected.sort_index())  # type: ignore[attr-defined]

    local_result, rawvm_result = statistics.median(local_times), statistics.median(rawvm_times)
    tls_result = statistics.median(tls_times)
    rows = args.rows * args.parts
    print(f"groupby over {rows} rows in {args.parts} parquet files, {args.workers} workers, median of {args.repeats}")
    print(f"{'':14}{'ready s':>10}{'result s':>10}")
    print(f"{'LocalCluster':14}{local_ready:>10.2f}{local_result:>10.3f}")
    print(f"{'  + TLS':14}{tls_ready:>10.2f}{tls_result:>10.3f}")
    print(f"{'rawvm (local)':14}{rawvm_ready:>10.2f}{rawvm_result:>10.3f}")
    print(f"{'rawvm / Local':14}{rawvm_ready / local_ready:>9.1f}x{rawvm_result / local_result:>9.2f}x")
    print(f"{'rawvm / +TLS':14}{rawvm_ready / tls_ready:>9.1f}x{rawvm_result / tls_result:>9.2f}x")


if __name__ == "__main__":
    main()
