"""How the suite spreads over pytest-xdist's workers (``--numprocesses auto`` in pyproject.toml).

Most of the suite waits: on PyPI, on agents starting, on machines idling off (a serial run kept 48 % of one core
busy on this 2-core machine). So it runs on a worker per core, with three rules:

- **a test file is a unit**: its module fixtures (the corpus locks, a shared agent, a booted VM) are made once, on
  the worker that runs all of its tests;
- **the VM tests are one unit**: they share one image build (``~/.cache/rawvm/images``) and must not boot two
  TCG guests at once on two cores;
- **the longest units start first**, so that none of them is left running alone at the end: a unit starts in the
  order of the items (xdist's scheduler takes them first come, first served), so known-long files go first —
  except the VM unit, which goes **last**: a TCG guest wants both cores, and its in-guest timers (idle-off,
  keepalives, the watchdog) are what the VM tests check, so it runs beside as little else as possible.

The summaries a test wants shown (the corpus share) travel as a ``rawvm_summary`` user property: a worker's own
output never reaches the terminal, and :func:`summaries` prints them at the end of the run, with or without xdist.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from xdist.scheduler import LoadScopeScheduling

VM_GROUP = "vm"
VM_TESTS = "tests/vm/"
SUMMARY = "rawvm_summary"
# Files that take minutes, longest first (`--durations` of a whole run); everything else keeps collection order.
LONG_FIRST = (
    "tests/resolver/test_real_envs.py",
    "tests/fuzz/test_agent_api_fuzz.py",
    "tests/bootstrap/test_dask_cluster.py",
    "tests/resolver/test_lock_foreign.py",
    "tests/bootstrap/test_notebook.py",
    "tests/faults/test_aws_faults.py",
    "tests/bootstrap/test_aws_provider.py",
    "tests/resolver/test_pypi_only_lock.py",
)


def unit_of(nodeid: str) -> str:
    """The unit a test runs in: ``vm`` for the VM tests, else its file (``tests/x/test_y.py``)."""
    path = nodeid.split("::", 1)[0]
    return VM_GROUP if path.startswith(VM_TESTS) else path


def order_long_first(items: list[pytest.Item]) -> None:
    """Put the long units first and the VM unit last, in place; the rest keep their collection order (the sort is
    stable)."""
    rank = {name: index for index, name in enumerate(LONG_FIRST)} | {VM_GROUP: len(LONG_FIRST) + 1}
    items.sort(key=lambda item: rank.get(unit_of(item.nodeid), len(LONG_FIRST)))


class UnitScheduling(LoadScopeScheduling):
    """xdist's scope scheduling with :func:`unit_of` as the scope, units handed out in collection order (run
    with ``--no-loadscope-reorder``, else xdist puts the units with the most tests first). Not ``loadgroup``:
    with pytest 9.2 xdist 3.8 renames the node ids it groups by through ``Item._nodeid``, which pytest no longer
    reads, so every test would be a unit of its own."""

    def _split_scope(self, nodeid: str) -> str:  # xdist's extension point: the other schedulers override it too
        return unit_of(nodeid)


def summaries(reports: Iterable[pytest.TestReport]) -> list[str]:
    """The ``rawvm_summary`` texts the run's tests recorded, in report order."""
    return [str(value) for report in reports for name, value in report.user_properties if name == SUMMARY]
