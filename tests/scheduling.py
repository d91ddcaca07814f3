"""How the suite spreads over pytest-xdist's workers (``-n auto --dist loadgroup`` in pyproject.toml).

Most of the suite waits: on PyPI, on agents starting, on machines idling off (a serial run kept 48 % of one core
busy on this 2-core machine). So it runs on a worker per core, with three rules:

- **a test file is a unit**: its module fixtures (the corpus locks, a shared agent, a booted VM) are made once, on
  the worker that runs all of its tests;
- **the VM tests are one unit**: they share one image build (``~/.cache/rawvm/images``) and must not boot two
  TCG guests at once on two cores;
- **the longest units start first**, so that none of them is left running alone at the end: a unit starts in the
  order of the items (xdist's scheduler takes them first come, first served), so known-long files go first.

The summaries a test wants shown (the corpus share) travel as a ``rawvm_summary`` user property: a worker's own
output never reaches the terminal, and :func:`summaries` prints them at the end of the run, with or without xdist.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest

VM_GROUP = "vm"
SUMMARY = "rawvm_summary"
# Files that take minutes, longest first (`--durations` of a whole run); everything else keeps collection order.
LONG_FIRST = (
    "tests/resolver/test_real_envs.py",
    VM_GROUP,
    "tests/fuzz/test_agent_api_fuzz.py",
    "tests/bootstrap/test_dask_cluster.py",
    "tests/resolver/test_lock_foreign.py",
    "tests/bootstrap/test_notebook.py",
    "tests/faults/test_aws_faults.py",
    "tests/bootstrap/test_aws_provider.py",
    "tests/resolver/test_pypi_only_lock.py",
)


def unit_of(item: pytest.Item, root: Path) -> str:
    """The xdist group of a test: ``vm`` for the VM tests, else its file, relative to the repository."""
    path = Path(item.path)
    if item.get_closest_marker("vm") or path.parent.name == VM_GROUP:
        return VM_GROUP
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def group_and_order(items: list[pytest.Item], root: Path) -> None:
    """Mark every item with its unit and put the long units first (in place; stable otherwise)."""
    rank = {name: index for index, name in enumerate(LONG_FIRST)}
    units = {}
    for item in items:
        units[item.nodeid] = unit = unit_of(item, root)
        item.add_marker(pytest.mark.xdist_group(unit))
    items.sort(key=lambda item: rank.get(units[item.nodeid], len(rank)))


def summaries(reports: Iterable[pytest.TestReport]) -> list[str]:
    """The ``rawvm_summary`` texts the run's tests recorded, in report order."""
    return [str(value) for report in reports for name, value in report.user_properties if name == SUMMARY]
