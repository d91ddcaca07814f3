"""The suite's own spread over xdist workers (tests/scheduling.py): a file per unit, the VM tests one unit, long
units first and the VM unit last, summaries shown whichever worker ran them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.scheduling import LONG_FIRST, SUMMARY, VM_GROUP, order_long_first, summaries, unit_of

TESTS = Path(__file__).resolve().parent


def test_a_file_is_a_unit_and_the_vm_tests_are_one() -> None:
    assert unit_of("tests/agent/test_spawn.py::test_x[a-b]") == "tests/agent/test_spawn.py"
    assert unit_of("tests/vm/test_qemu_agent.py::test_boot") == VM_GROUP
    assert unit_of("tests/vm/test_dask_qemu.py::test_dask") == VM_GROUP


def test_every_long_unit_named_exists() -> None:
    for unit in LONG_FIRST:
        assert (TESTS.parent / unit).is_file(), unit


def test_long_units_go_first_the_vm_unit_last_and_the_rest_keep_their_order() -> None:
    class Item:
        def __init__(self, nodeid: str) -> None:
            self.nodeid = nodeid

    names = ["tests/a.py::t1", "tests/vm/test_q.py::t", "tests/b.py::t2", f"{LONG_FIRST[0]}::t", "tests/a.py::t3"]
    items = [Item(name) for name in names]
    order_long_first(items)  # type: ignore[arg-type]
    assert [item.nodeid for item in items] == [names[3], names[0], names[2], names[4], names[1]]


def test_summaries_come_from_the_reports_user_properties() -> None:
    report = pytest.TestReport("t", ("f", 1, "t"), {}, "passed", None, "call", user_properties=[(SUMMARY, "42/47")])
    other = pytest.TestReport("u", ("f", 2, "u"), {}, "passed", None, "call", user_properties=[("x", "y")])
    assert summaries([report, other]) == ["42/47"]
