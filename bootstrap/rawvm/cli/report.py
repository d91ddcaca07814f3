"""``rawvm report CLUSTER -o report.html``: what ran and what it cost, from the sink and the running agents.

HTML (self-contained: inline SVG, no script) or PNG, or the raw series as parquet or csv (``--format``, else from
the output's suffix). The numbers are rawvm.observe.report_data's; the drawing is rawvm.observe.report_render's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rawvm.errors import UsageError

FORMATS = ("html", "png", "parquet", "csv")


def output_format(path: Path, given: str | None) -> str:
    if given:
        return given
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("htm", "html"):
        return "html"
    if suffix in FORMATS:
        return suffix
    raise UsageError(f"-o {path}: say which format with --format {'|'.join(FORMATS)} (or end the name in one)")


def make_report(cluster: str, output: Path, fmt: str, *, live: bool = True, max_machines: int = 24) -> Any:
    """Write the report; returns its Summary."""
    from rawvm.observe import report_data, report_summary

    report_data.need_polars()
    telemetry = report_data.collect(cluster, live=live)
    frames = report_data.frames(telemetry)
    summary = report_summary.summarize(telemetry, frames)
    output.parent.mkdir(parents=True, exist_ok=True)
    if fmt in ("parquet", "csv"):
        table = report_data.wide(frames)
        if fmt == "parquet":
            table.write_parquet(output)
        else:
            table.write_csv(output)
        return summary
    from rawvm.observe import report_render

    tasks = telemetry.task_marks()
    if fmt == "html":
        report_render.write_html(output, summary, frames, tasks, max_machines)
    else:
        report_render.write_png(output, summary, frames, tasks, max_machines)
    return summary


def _report(args: argparse.Namespace) -> int:
    output = Path(args.output)
    fmt = output_format(output, args.format)
    if args.max_machines < 1:
        raise UsageError("--max-machines must be at least 1")
    summary = make_report(args.cluster, output, fmt, live=not args.sink_only, max_machines=args.max_machines)
    idle_cost = "unknown" if summary.idle_gpu_cost_usd is None else f"${summary.idle_gpu_cost_usd:.2f}"
    print(
        f"rawvm: {output} ({fmt}): {summary.machine_count} machines, {summary.machine_hours:.2f} machine-hours, "
        f"{summary.gpu_hours:.2f} GPU-hours, {summary.idle_gpu_hours:.2f} idle ({idle_cost})",
        file=sys.stderr,
    )
    return 0


def register(subparsers: Any) -> None:
    report = subparsers.add_parser(
        "report",
        help="plots and a summary of a cluster's telemetry (also after its machines are gone)",
        description="Per machine over time: CPU, memory, network, each GPU's utilization, memory and power, with "
        "task marks; on top: machine-hours, GPU-hours, mean and p95 GPU utilization, idle GPU-hours and their "
        "cost, the busiest and idlest machines. Needs the report extra: pip install 'rawvm[report]'.",
    )
    report.add_argument("cluster", metavar="CLUSTER")
    report.add_argument("-o", "--output", default="report.html", metavar="FILE", help="where (%(default)s)")
    report.add_argument("--format", choices=FORMATS, default=None, help="default: from the output's suffix")
    report.add_argument("--sink-only", action="store_true", help="only what the machines flushed; ask no agent")
    report.add_argument(
        "--max-machines", type=int, default=24, metavar="N", help="draw at most N machines (%(default)s)"
    )
    report.set_defaults(func=_report)
