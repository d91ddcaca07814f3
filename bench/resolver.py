"""Benchmark: `rawvm lock` against raw `uv pip compile` with the same inputs, warm cache, side by side.

The environment is bench/data/datascience-macos-arm64 (~150 distributions from a macOS arm64 laptop: torch,
pandas, polars, scikit-learn, jupyter, dask, pyarrow, ...). For each cross-architecture target, rawvm's full lock
(scan, translate, uv, pylock, report, bundle) is timed against the exact `uv pip compile` command rawvm runs,
fed the same requirements and constraints. Target: rawvm <= 1.3x uv. Run: uv run python bench/resolver.py
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from rawvm_resolver import Target, lock
from rawvm_resolver.compile import CompileInputs, uv_compile_command, write_inputs
from rawvm_resolver.scan import scan
from rawvm_resolver.translate import translate

ENVIRONMENT = Path(__file__).resolve().parent / "data" / "datascience-macos-arm64"
TARGETS = {
    "linux-x86_64 --cuda": Target(arch="x86_64", python="3.11", accelerator="cuda", cuda="12.8"),
    "linux-aarch64": Target(arch="aarch64", python="3.11"),
}


def time_rawvm(target: Target, work: Path, project: Path) -> float:
    start = time.perf_counter()
    lock(ENVIRONMENT, target, work / "bundle", project_dir=project)
    return time.perf_counter() - start


def time_uv(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    env = scan(ENVIRONMENT)
    source = env.platform
    print(f"environment: {len(env.distributions)} distributions from {source.platform}, Python {source.python}")
    ratios = []
    with tempfile.TemporaryDirectory(prefix="rawvm-bench-") as scratch:
        work, project = Path(scratch), Path(scratch) / "project"
        project.mkdir()
        for label, target in TARGETS.items():
            plan = translate(env, target)
            inputs = CompileInputs(plan.requirement_lines(), plan.constraint_lines(), target, plan.extra_index_urls)
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
                f"ratio {rawvm_median / uv_median:.2f}x (target <= 1.3x)"
            )
    print(f"worst ratio {max(ratios):.2f}x over {args.runs} runs per target")


if __name__ == "__main__":
    main()
