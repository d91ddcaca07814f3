"""``rawvm sweep [--region R | --all-regions] [--dry-run]``: what rawvm left on AWS, its monthly cost, deleted.

What counts as a leftover is in rawvm.providers.aws.sweep; nothing without a rawvm tag is ever touched. ``--dry-run``
lists exactly what a sweep without it deletes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rawvm.errors import RawvmError


def register(subparsers: Any) -> None:
    sweep = subparsers.add_parser(
        "sweep",
        help="list and delete what rawvm left behind on AWS (only what rawvm tagged)",
        description="Finds what rawvm tagged that should be gone: instances past rawvm:expires, security groups "
        "and launch templates no live cluster uses, volumes and network interfaces left available, staging "
        "objects past their lifetime. Lists them with their monthly cost, then deletes them (not with --dry-run).",
    )
    where = sweep.add_mutually_exclusive_group()
    where.add_argument("--region", default="", metavar="R", help="AWS region (default: your configured one)")
    where.add_argument("--all-regions", action="store_true", help="every region enabled for the account")
    sweep.add_argument("--dry-run", action="store_true", help="list what would be deleted; delete nothing")
    sweep.add_argument("--json", action="store_true", help="list as JSON")
    sweep.add_argument("--bucket", default="", help=argparse.SUPPRESS)  # staging bucket (default: the configured)
    sweep.add_argument("--endpoint-url", default=None, help=argparse.SUPPRESS)  # a local AWS mock
    sweep.add_argument("--config", type=Path, default=None, help=argparse.SUPPRESS)  # settings file (tests)
    sweep.set_defaults(func=run_sweep)


def _money(value: float | None) -> str:
    if value is None:
        return "unknown"
    return "free" if value == 0 else f"${value:,.2f}"


def _print_table(leftovers: list[Any], regions: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not leftovers:
        console.print(f"nothing to sweep in {', '.join(regions)}")
        return
    table = Table(title="rawvm leftovers", title_justify="left")
    for column in ("kind", "id", "region", "cluster", "why", "$/month"):
        table.add_column(column, overflow="fold", justify="right" if column == "$/month" else "left")
    for x in leftovers:
        table.add_row(x.kind, x.id, x.region, x.cluster, x.why, _money(x.monthly_usd))
    console.print(table)
    known = sum(x.monthly_usd for x in leftovers if x.monthly_usd is not None)
    unknown = sum(1 for x in leftovers if x.monthly_usd is None)
    more = f" (+{unknown} of unknown price)" if unknown else ""
    console.print(f"{len(leftovers)} leftover{'s' if len(leftovers) != 1 else ''}: ${known:,.2f}/month{more}")


def run_sweep(args: argparse.Namespace) -> int:
    from botocore.exceptions import BotoCoreError, ClientError

    from rawvm.providers.aws import sweep as aws_sweep
    from rawvm.providers.aws.config import aws_error
    from rawvm.providers.aws.provider import AwsProvider

    provider = AwsProvider(args.region, args.bucket, endpoint_url=args.endpoint_url, config_path=args.config)
    now = time.time()
    try:
        if args.all_regions:
            anchor = provider.region or provider.session.region_name or "us-east-1"
            answer = provider.client("ec2", anchor).describe_regions()
            regions = sorted(str(r["RegionName"]) for r in answer.get("Regions", []))
        else:
            regions = [provider.resolve_region(args.region)]
        found: dict[str, list[aws_sweep.Leftover]] = {}
        for region in regions:
            ec2 = provider.client("ec2", region)
            leftovers = aws_sweep.find_ec2(ec2, region, provider.prices, now)
            leftovers += aws_sweep.find_staging(
                provider.client("s3", region), provider.bucket_name(region), region, provider.prices, now
            )
            found[region] = sorted(leftovers, key=aws_sweep.sort_key)
    except (ClientError, BotoCoreError) as exc:
        raise RawvmError(f"sweep could not read AWS: {aws_error(exc)}") from None
    everything = [x for region in regions for x in found[region]]
    if args.json:
        print(json.dumps([asdict(x) for x in everything], indent=2, sort_keys=True))
    else:
        _print_table(everything, regions)
    if args.dry_run or not everything:
        if args.dry_run and everything:
            print("rawvm: dry run: nothing deleted; 'rawvm sweep' without --dry-run deletes these", file=sys.stderr)
        return 0
    errors: list[str] = []
    for region in regions:
        if not found[region]:
            continue
        try:
            errors += aws_sweep.delete(
                provider.client("ec2", region),
                provider.client("s3", region),
                found[region],
                timeout=provider.down_timeout,
                poll=provider.poll,
                sleep=provider.sleep,
            )
        except (ClientError, BotoCoreError) as exc:
            errors.append(f"{region}: {aws_error(exc)}")
    for line in errors:
        print(f"rawvm: could not delete {line}", file=sys.stderr)
    deleted = len(everything) - len(errors)
    print(f"rawvm: swept {deleted} of {len(everything)} leftovers", file=sys.stderr)
    return 1 if errors else 0
