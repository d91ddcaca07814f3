"""Benchmark: `rawvm lock` against raw `uv pip compile` with the same inputs, warm cache, side by side.

The environment is bench/data/datascience-macos-arm64 (~150 distributions from a macOS arm64 laptop: torch,
pandas, polars, scikit-learn, jupyter, dask, pyarrow, ...). For each cross-architecture target, rawvm's full lock
(scan, translate, uv, pylock, report, bundle) is timed against the exact `uv pip compile` command rawvm runs,
fed the same requirements and constraints. Target: rawvm <= 1.3x uv.

Then the public corpus (tests/data/real-envs: real macOS freezes, poetry exports, conda files): each file is
locked for linux-x86_64 at the default image's glibc (conda files with --pypi-only: no channel is reachable
here), timed on a second pass with uv's cache warm from the first, printing the median and worst lock time, how
many locked, and how many uv runs the relaxation of inconsistent pins needed.
With ``--dns-stall S`` every third name lookup of this process stalls S seconds first, as this network's resolver
does at times (uv, a separate process, is not slowed): the run shows what pooling the index lookups buys.
Run: uv run python bench/resolver.py [--runs N] [--no-corpus] [--dns-stall S]
"""

from __future__ import annotations

import argparse
import ipaddress
import itertools
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from rawvm_images.ec2 import UBUNTU_2404_GLIBC
from rawvm_resolver import Target, lock
from rawvm_resolver.compile import compile_inputs, uv_compile_command, write_inputs
from rawvm_resolver.errors import InputError, ResolverError
from rawvm_resolver.index_http import fresh_client
from rawvm_resolver.scan import scan
from rawvm_resolver.translate import translate

ENVIRONMENT = Path(__file__).resolve().parent / "data" / "datascience-macos-arm64"
CORPUS = Path(__file__).resolve().parents[1] / "tests" / "data" / "real-envs"
TARGETS = {
    "linux-x86_64 --cuda": Target(arch="x86_64", python="3.11", accelerator="cuda", cuda="12.8"),
    "linux-aarch64": Target(arch="aarch64", python="3.11"),
}


def time_rawvm(target: Target, work: Path, project: Path) -> float:
    client = fresh_client()  # each lock starts as a new `rawvm lock` process would: no address or connection kept
    start = time.perf_counter()
    lock(ENVIRONMENT, target, work / "bundle", project_dir=project)
    elapsed = time.perf_counter() - start
    LOOKUPS.append((client.requests, client.lookups))
    return elapsed


LOOKUPS: list[tuple[int, int]] = []


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def stall_name_lookups(seconds: float) -> None:
    """Every third getaddrinfo of this process waits ``seconds`` first (the stalls this network shows at times)."""
    real = socket.getaddrinfo
    counter = itertools.count()

    def stalling(host: str, *args: object, **kwargs: object) -> object:
        if not is_address(host) and next(counter) % 3 == 0:  # an address literal asks no DNS server
            time.sleep(seconds)
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    socket.getaddrinfo = stalling  # type: ignore[assignment]


def time_uv(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-corpus", action="store_true", help="skip the corpus part")
    parser.add_argument("--dns-stall", type=float, default=0.0, help="stall every third name lookup this long")
    args = parser.parse_args()
    if args.dns_stall:
        stall_name_lookups(args.dns_stall)
    env = scan(ENVIRONMENT)
    source = env.platform
    print(f"environment: {len(env.distributions)} distributions from {source.platform}, Python {source.python}")
    ratios = []
    with tempfile.TemporaryDirectory(prefix="rawvm-bench-") as scratch:
        work, project = Path(scratch), Path(scratch) / "project"
        project.mkdir()
        for label, target in TARGETS.items():
            plan = translate(env, target)
            inputs = compile_inputs(plan, target)
            requirements, constraints = write_inputs(inputs, work / "uv-inputs")
            command = uv_compile_command(inputs, requirements, constraints, work / "uv-out" / "pylock.toml")
            (work / "uv-out").mkdir(exist_ok=True)
            time_uv(command), time_rawvm(target, work, project)  # warm uv's cache for both
            uv_times, rawvm_times = [], []
            for _ in range(args.runs):  # interleaved, so drift on a shared machine hits both alike
                uv_times.append(time_uv(command))
                rawvm_times.append(time_rawvm(target, work, project))
            uv_median, rawvm_median = statistics.median(uv_times), statistics.median(rawvm_times)
            ratios.append(rawvm_median / uv_median)
            print(
                f"{label:<22} {len(plan.requirements)} requirements, {len(plan.constraints)} constraints: "
                f"uv pip compile median {uv_median:.3f}s, rawvm lock median {rawvm_median:.3f}s, "
                f"ratio {rawvm_median / uv_median:.2f}x (target <= 1.3x); index requests/name lookups per lock "
                f"{LOOKUPS[-1][0]}/{LOOKUPS[-1][1]}"
            )
    print(f"worst ratio {max(ratios):.2f}x over {args.runs} runs per target")
    if not args.no_corpus:
        bench_corpus()


def bench_corpus() -> None:
    """Median and worst lock time over the corpus, and the uv runs the relaxation needed."""
    target = Target(arch="x86_64", python="3.11", glibc=UBUNTU_2404_GLIBC)
    files = sorted(path for path in CORPUS.iterdir() if path.is_file())
    times: list[float] = []
    relaxed: dict[str, int] = {}
    locked = 0
    with tempfile.TemporaryDirectory(prefix="rawvm-bench-corpus-") as scratch:
        work = Path(scratch)
        for index, path in enumerate(files):
            for attempt in ("warm", "timed"):  # the first fills uv's cache, as a user's second lock would find it
                start = time.perf_counter()
                try:
                    conda = path.name.startswith("conda-")  # no conda channel reachable here: --pypi-only
                    result = lock(path, target, work / f"{index}-{attempt}", project_dir=work, pypi_only=conda)
                except (ResolverError, InputError) as exc:
                    outcome = f"failed: {exc}"
                    relaxation = 0
                else:
                    outcome, relaxation = "locked", result.relaxation_runs
                elapsed = time.perf_counter() - start
            times.append(elapsed)
            locked += outcome == "locked"
            if relaxation:
                relaxed[path.name] = relaxation
            print(f"  {path.name:<34} {elapsed:6.2f}s  {outcome}  (relaxation uv runs: {relaxation})")
    print(
        f"corpus: {locked}/{len(files)} locked for {target.platform} glibc {target.glibc}; lock time median "
        f"{statistics.median(times):.2f}s, worst {max(times):.2f}s; relaxation needed by {len(relaxed)} files, "
        f"{sum(relaxed.values())} uv runs in all, at most {max(relaxed.values(), default=0)} for one file"
    )


if __name__ == "__main__":
    main()
