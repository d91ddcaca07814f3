"""``rawvm lock`` and ``rawvm export``: the resolver on the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rawvm_images.ec2 import UBUNTU_2404_GLIBC
from rawvm_images.local_vm import DEBIAN_12_GLIBC
from rawvm_resolver.errors import InputError
from rawvm_resolver.export import FORMATS, export
from rawvm_resolver.report import format_table, to_json
from rawvm_resolver.target import (
    DEFAULT_CUDA,
    PLATFORMS,
    Target,
    parse_cuda_version,
    parse_glibc_version,
    parse_platform,
    parse_python_version,
)

# The glibc of each provider's default image: a lock for it may use every wheel that image can run.
PROVIDER_GLIBC = {"aws": UBUNTU_2404_GLIBC, "qemu": DEBIAN_12_GLIBC}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "lock",
        help="lock an environment for a Linux VM into a bundle",
        description="Scan an environment, translate it for a Linux target, lock it with uv, write the bundle.",
    )
    parser.add_argument(
        "--from",
        dest="source",
        metavar="PATH",
        help="interpreter, venv, site-packages, requirements file, pyproject.toml, a lock (uv.lock, poetry.lock, "
        "pdm.lock, Pipfile.lock, pylock.toml, conda-lock.yml) or a directory holding one, environment.yml "
        "or a conda list --export/--explicit file (default: the running environment)",
    )
    parser.add_argument("--platform", default="linux-x86_64", help=f"one of {', '.join(PLATFORMS)}")
    parser.add_argument(
        "--cuda", nargs="?", const=DEFAULT_CUDA, default=None, metavar="VERSION", help="lock for an NVIDIA GPU"
    )
    parser.add_argument(
        "--python", default="", metavar="X.Y", help="the VM's Python (default: the source's, or what its files imply)"
    )
    parser.add_argument("--torch-index", default="", metavar="URL", help="index for torch (needed for aarch64 CUDA)")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="make any version change an error (inconsistent pins included: no relaxation)",
    )
    parser.add_argument(
        "--provider",
        choices=sorted(PROVIDER_GLIBC),
        default="aws",
        help="whose default image the lock is for: sets the glibc level (aws: Ubuntu 24.04, glibc "
        f"{UBUNTU_2404_GLIBC}; qemu: Debian 12, glibc {DEBIAN_12_GLIBC}) (%(default)s)",
    )
    parser.add_argument("--glibc", default="", metavar="2.X", help="the target's glibc (default: the provider's image)")
    parser.add_argument(
        "--keep-vcs",
        action="store_true",
        help="keep git+/hg+ sources as VCS requirements the VM fetches (default: the index release of the same name)",
    )
    parser.add_argument(
        "--conda-channel",
        action="append",
        default=[],
        metavar="URL",
        help="conda channel for the conda part, repeatable (default: the environment's, else conda-forge)",
    )
    parser.add_argument(
        "--pypi-only",
        action="store_true",
        help="lock a conda environment from PyPI alone: conda packages become PyPI pins, conda-only ones are dropped",
    )
    parser.add_argument("--explain", action="store_true", help="print every decision with its reason")
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="DIR", help="bundle directory")
    parser.set_defaults(func=run_lock)

    exporter = subparsers.add_parser(
        "export",
        help="export a bundle as requirements.txt, pylock.toml, conda-lock.yml or a Dockerfile",
        description="Export a bundle's lock in a standard format for production.",
    )
    exporter.add_argument("bundle", type=Path, metavar="BUNDLE")
    exporter.add_argument("--format", required=True, choices=FORMATS)
    exporter.add_argument("-o", "--output", required=True, type=Path, metavar="FILE")
    exporter.set_defaults(func=run_export)


def target_from_args(args: argparse.Namespace) -> Target:
    arch = parse_platform(args.platform)
    python = parse_python_version(args.python) if args.python else ""
    glibc = parse_glibc_version(args.glibc) if args.glibc else PROVIDER_GLIBC[args.provider]
    if args.cuda is not None:
        return Target(arch=arch, python=python, glibc=glibc, accelerator="cuda", cuda=parse_cuda_version(args.cuda))
    return Target(arch=arch, python=python, glibc=glibc)


def run_lock(args: argparse.Namespace) -> int:
    from rawvm_resolver import lock  # the whole resolver, only for the commands that lock (~40 ms on every other)

    target = target_from_args(args)
    if args.torch_index and not args.torch_index.startswith(("https://", "http://", "file://")):
        raise InputError(
            f"--torch-index {args.torch_index!r} is not a URL: e.g. https://download.pytorch.org/whl/cu128"
        )
    quiet = args.json or not sys.stderr.isatty()  # progress is for people watching, not for logs
    result = lock(
        args.source,
        target,
        args.output,
        torch_index=args.torch_index,
        strict=args.strict,
        conda_channels=args.conda_channel,
        pypi_only=args.pypi_only,
        keep_vcs=args.keep_vcs,
        progress=None if quiet else (lambda message: print(f"rawvm: {message}", file=sys.stderr)),
    )
    for warning in result.warnings:
        print(f"rawvm: warning: {warning}", file=sys.stderr)
    print(f"rawvm: Python {result.target.python}: {result.python_from}", file=sys.stderr)
    if args.json:
        print(
            to_json(
                result.rows,
                bundle=str(result.bundle_dir),
                manifest_sha256=result.manifest_sha256,
                target=result.target.platform,
                python=result.target.python,
                python_from=result.python_from,
                accelerator=result.target.accelerator,
            )
        )
    elif args.explain:
        title = f"{result.target.platform} Python {result.target.python} ({result.target.accelerator})"
        print(format_table(result.rows, title=title))
    print(f"rawvm: bundle {result.bundle_dir} (rawvm-env.toml sha256 {result.manifest_sha256})", file=sys.stderr)
    return 0


def run_export(args: argparse.Namespace) -> int:
    data = export(args.bundle, args.format)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(data)
    print(f"rawvm: wrote {args.output} ({args.format})", file=sys.stderr)
    return 0
