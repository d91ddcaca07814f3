"""The reliability suite's tally (tests/faults and tests/fuzz): what each test survived, printed at the end.

Each fault test calls ``survived(name)`` once it has asserted that the machine stopped and what was kept; the
fuzz tests add their counts. ``pytest_terminal_summary`` (registered by both suites' conftest.py, printed once)
shows ``faults survived N/N`` against the fault tests that ran, so a failed or skipped one shows as missing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pytest


@dataclass
class Tally:
    survived: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    fault_tests: set[str] = field(default_factory=set)  # node ids of the fault tests selected (a skip counts)
    printed: bool = False


TALLY = Tally()


def survived(name: str) -> None:
    TALLY.survived.append(name)


def count(key: str, n: int = 1) -> None:
    TALLY.counts[key] += n


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "setup" and "faults" in report.keywords and "/fuzz/" not in report.nodeid:
        TALLY.fault_tests.add(report.nodeid)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TALLY.printed or not (TALLY.fault_tests or TALLY.counts):
        return
    TALLY.printed = True
    c = TALLY.counts
    write = terminalreporter.write_line
    terminalreporter.section("rawvm reliability")
    if TALLY.fault_tests:
        write(f"faults survived {len(TALLY.survived)}/{len(TALLY.fault_tests)}: {', '.join(TALLY.survived)}")
    if c["requests_fuzzed"]:
        write(
            f"requests fuzzed {c['requests_fuzzed']}, 5xx {c['responses_5xx']}, "
            f"unauthenticated served {c['unauthenticated_served']}, idle clock moved by strangers "
            f"{c['idle_clock_moved']}, agent RSS growth {c['rss_growth_kib'] / 1024:.1f} MiB"
        )
    if "cycles" in c or "resources_leaked" in c:
        write(
            f"moto up/down cycles {c['cycles']}, faults injected {c['aws_faults_injected']}, "
            f"resources leaked {c['resources_leaked']}"
        )
