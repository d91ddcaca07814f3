"""``rawvm-agent --config /etc/rawvm/agent.toml``: run the agent until the machine powers off."""

from __future__ import annotations

import argparse
import asyncio
import sys

from rawvm_agent import __version__
from rawvm_agent.config import ConfigError, load_config
from rawvm_agent.durations import DurationError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rawvm-agent", description=__doc__)
    parser.add_argument("--config", default="/etc/rawvm/agent.toml", help="agent.toml (default: %(default)s)")
    parser.add_argument("--version", action="version", version=f"rawvm-agent {__version__}")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        config.token_digest()
        config.check_channel()  # one clear line rather than an API served in cleartext
    except (ConfigError, DurationError, OSError) as exc:
        print(f"rawvm-agent: {exc}", file=sys.stderr)
        return 2

    # The bundle's download begins now, in threads, while the imports below take their seconds (prefetch.py).
    from rawvm_agent.prefetch import BundlePrefetch

    prefetch = BundlePrefetch.for_first_start(config)

    from rawvm_agent.server import serve

    try:
        return asyncio.run(serve(config, prefetch=prefetch))
    except OSError as exc:  # e.g. the port is taken, the TLS files are unreadable
        print(f"rawvm-agent: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"rawvm-agent: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
