"""``rawvm setup aws [--region R] [--bucket B]``: the one-time cloud setup (only things with no standing cost)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    setup = subparsers.add_parser(
        "setup",
        help="one-time cloud setup",
        description="The one-time setup of a cloud account for rawvm; it makes nothing with a standing cost.",
    )
    clouds = setup.add_subparsers(dest="cloud", required=True)
    aws = clouds.add_parser(
        "aws",
        help="create the S3 staging bucket (private, objects expire after 3 days)",
        description="Creates rawvm's S3 staging bucket (public access blocked, objects expire after 3 days) and "
        "remembers the region and bucket. Nothing with a standing cost is made (no NAT gateway, no instances).",
    )
    aws.add_argument("--region", default="", metavar="R", help="AWS region (default: AWS_REGION / your AWS config)")
    aws.add_argument("--bucket", default="", metavar="B", help="bucket name (default: rawvm-staging-ACCOUNT-REGION)")
    aws.add_argument("--endpoint-url", default=None, help=argparse.SUPPRESS)  # a local AWS mock
    aws.add_argument("--config", type=Path, default=None, help=argparse.SUPPRESS)  # settings file (tests)
    aws.set_defaults(func=setup_aws)


def setup_aws(args: argparse.Namespace) -> int:
    from rawvm.providers.aws.config import default_config_path, read_settings, write_settings
    from rawvm.providers.aws.provider import AwsProvider

    config_path: Path = args.config or default_config_path()
    provider = AwsProvider(args.region, args.bucket, endpoint_url=args.endpoint_url, config_path=config_path)
    region, bucket, created = provider.setup(args.region)
    write_settings(config_path, {**read_settings(config_path), "region": region, "bucket": bucket})
    verb = "created" if created else "already there, policy refreshed:"
    print(f"rawvm: staging bucket {verb} s3://{bucket} ({region}); settings in {config_path}")
    return 0
