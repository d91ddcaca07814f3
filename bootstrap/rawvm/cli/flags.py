"""The launch flags shared by ``run``, ``up``, ``batch run`` and ``dask up``, and the one place they become a
``LaunchOptions`` (so the CLI and the Python front door validate the same way)."""

from __future__ import annotations

import argparse
import inspect

from rawvm.errors import UsageError
from rawvm.options import PROVIDERS, LaunchOptions


def machine_flags(
    parser: argparse.ArgumentParser,
    *,
    machines: str = "how many machines",
    keepalive: str = "machines stop after this long idle",
) -> None:
    """The launch flags every launching command shares (run, up, batch run, dask up); ``machines`` and
    ``keepalive`` word the two helps that differ by command."""
    parser.add_argument(
        "--provider", default="local", help=f"where machines run: {' | '.join(PROVIDERS)} (%(default)s)"
    )
    parser.add_argument("-n", type=int, default=1, metavar="N", help=f"{machines} (%(default)s)")
    parser.add_argument("--vm-type", default="", metavar="T", help="instance type, e.g. m7i.large")
    parser.add_argument("--cpu", type=int, default=0, metavar="C", help="at least C vCPUs (instead of --vm-type)")
    parser.add_argument("--memory", type=float, default=0, metavar="M", help="at least M GiB of memory")
    parser.add_argument("--gpu", action="store_true", help="an NVIDIA GPU machine (CUDA lock)")
    parser.add_argument("--arm", action="store_true", help="an aarch64 machine")
    parser.add_argument("--region", default="", metavar="R", help="cloud region (aws)")
    parser.add_argument("--efa", action="store_true", help="aws: EFA interfaces for multi-node GPU training")
    parser.add_argument("--keepalive", default="20m", metavar="D", help=f"{keepalive} (%(default)s)")
    parser.add_argument(
        "--max-lifetime", default="12h", metavar="D", help="machines stop after this long, even busy (%(default)s)"
    )
    parser.add_argument(
        "--spot-policy", default="on-demand", metavar="P", help="on-demand | spot | spot_with_fallback (%(default)s)"
    )
    parser.add_argument(
        "--from", dest="source", default=None, metavar="PATH", help="environment to lock (default: the running one)"
    )
    parser.add_argument(
        "--extra-ca-cert",
        dest="extra_ca_certs",
        action="append",
        default=[],
        metavar="PEM",
        help="a CA certificate the machines must trust (TLS-intercepting proxies); repeatable",
    )
    parser.add_argument(
        "--cluster", default=None, metavar="NAME", help="an existing cluster (see 'rawvm ls'); a new one: --name"
    )
    parser.add_argument(
        "--name", default=None, metavar="NAME", help="the new cluster's name (default: a fresh rawvm-xxxxxx)"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY[=VALUE]",
        help="a variable every task sees; KEY alone takes its value from here; repeatable",
    )
    parser.add_argument(
        "--secret",
        dest="secrets",
        action="append",
        default=[],
        metavar="KEY[=VALUE]",
        help="as --env, but masked in every log and output, and sent only over the agent API "
        "(prefer KEY alone: a value on the command line shows in this host's process list); repeatable",
    )
    parser.add_argument(
        "--pypi-only", action="store_true", help="lock a conda environment from PyPI alone (see rawvm lock --pypi-only)"
    )
    parser.add_argument(
        "--compile-bytecode",
        action="store_true",
        help="compile the environment's .pyc files at install: faster first imports, a slower install (off as in uv)",
    )
    parser.add_argument(
        "--max-cost",
        default="default",
        metavar="USD",
        help="cap on the launch's worst case (every machine until --max-lifetime), or 'none' "
        "(default: max-cost in pyproject.toml [tool.rawvm], else none)",
    )
    parser.add_argument(
        "--max-cost-action",
        default="",
        choices=["refuse", "shorten"],
        help="over --max-cost: refuse the launch (default) or shorten each machine's lifetime to fit",
    )


def launch_options(args: argparse.Namespace, *, n: int | None = None) -> LaunchOptions:
    """The options the shared flags say, through the front door's one builder (so a bad value is the same one
    line from the CLI and from Python); ``n`` overrides ``-n`` where it counts something else (a Dask cluster's
    workers, which may be 0). The flags' names are the builder's parameters: nothing lists them twice."""
    from rawvm.api import launch_options as build

    values = {name: getattr(args, name) for name in inspect.signature(build).parameters if hasattr(args, name)}
    values["cluster"] = cluster_name(getattr(args, "cluster", None), getattr(args, "name", None))
    if n is not None:
        values["n"] = n
    return build(**values)


def cluster_name(existing: str | None, new: str | None) -> str | None:
    """The cluster ``--cluster`` (which must exist) or ``--name`` (which must not) names: a mistyped
    ``--cluster`` is one line listing what exists, never a fresh 20-minute cluster of the typo's name."""
    from rawvm import clusters

    if existing and new:
        raise UsageError("give --cluster (an existing cluster) or --name (a new one), not both")
    if new:
        if clusters.exists(clusters.check_name(new)):
            raise UsageError(f"--name {new}: a cluster of that name exists; run on it with --cluster {new}")
        return new
    if not existing:
        return None
    if not clusters.exists(clusters.check_name(existing)):
        names = sorted(record.name for record in clusters.all_records())
        here = f"clusters here: {', '.join(names)}" if names else "there are no clusters here"
        raise UsageError(
            f"--cluster {existing}: no such cluster ({here}; see 'rawvm ls'); a new cluster is named with --name"
        )
    return existing
