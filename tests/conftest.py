"""Shared fixtures. Markers (network, vm, slow) are declared in the root pyproject.toml; CI runs them all.

A test whose needs this machine lacks (the package index for ``network``, qemu and debootstrap for ``vm``) is
skipped with the remedy in its reason; under ``CI=true`` it fails instead (tests/systools.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.scheduling import UnitScheduling, order_long_first, summaries
from tests.systools import need_index, need_vm_tools

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # An xdist worker starts with COLUMNS=80 and LINES=24 in its environment; what the tests start takes them for
        # the terminal's size (rich in `rawvm top` drew 24 lines into a 20-line tmux pane; uv wraps its messages).
        # A run in one process has neither: the workers run the same way.
        for name in ("COLUMNS", "LINES"):
            os.environ.pop(name, None)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("network"):
        need_index()
    if item.get_closest_marker("vm"):
        need_vm_tools()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    order_long_first(items)  # tests/scheduling.py


@pytest.hookimpl(optionalhook=True)  # `-p no:xdist` runs without it
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> UnitScheduling:
    return UnitScheduling(config, log)  # a file per unit, all VM tests one unit (tests/scheduling.py)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    reports = [report for key in ("passed", "failed") for report in terminalreporter.stats.get(key, [])]
    for text in summaries(reports):
        terminalreporter.write_line(text)
