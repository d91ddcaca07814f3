"""The Prometheus text format helpers: escaping, values, the naming rules; checked against the real promtool."""

from __future__ import annotations

import math
import subprocess

import pytest
from rawvm_agent.telemetry.prometheus import escape_help, escape_label_value, family, format_value, gauge

from tests.systools import need_tool


def promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    promtool = need_tool("promtool", "prometheus")
    return subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)


def test_label_values_escape_backslash_quote_and_newline() -> None:
    assert escape_label_value('a\\b"c\nd') == 'a\\\\b\\"c\\nd'


def test_help_escapes_backslash_and_newline_but_not_quotes() -> None:
    assert escape_help('say "hi"\\\nnow') == 'say "hi"\\\\\\nnow'


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (3, "3"),
        (True, "1"),
        (0.25, "0.25"),
        (1e-9, "1e-09"),
        (math.nan, "NaN"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
    ],
)
def test_values(value: float, text: str) -> None:
    assert format_value(value) == text


def test_family_has_help_type_and_samples() -> None:
    text = family("rawvm_x_bytes", "gauge", "X in bytes.", [({"a": "1"}, 2), ({"a": "2"}, 3.5)])
    assert text == (
        "# HELP rawvm_x_bytes X in bytes.\n"
        "# TYPE rawvm_x_bytes gauge\n"
        'rawvm_x_bytes{a="1"} 2\n'
        'rawvm_x_bytes{a="2"} 3.5\n'
    )


def test_empty_family_renders_nothing() -> None:
    assert family("rawvm_x_bytes", "gauge", "X.", []) == ""
    assert gauge("rawvm_x_bytes", "X.", None) == ""


@pytest.mark.parametrize(
    ("name", "type"),
    [("rawvm_requests", "counter"), ("rawvm_bytes_total", "gauge"), ("0bad", "gauge"), ("rawvm_x", "histogram")],
)
def test_naming_rules_are_enforced(name: str, type: str) -> None:
    with pytest.raises(ValueError):
        family(name, type, "help", [({}, 1)])


@pytest.mark.parametrize("label", ["0bad", "with-dash", "__reserved"])
def test_bad_label_names_are_refused(label: str) -> None:
    with pytest.raises(ValueError):
        family("rawvm_x_bytes", "gauge", "X.", [({label: "v"}, 1)])


def test_promtool_accepts_hostile_label_values_and_help() -> None:
    text = family(
        "rawvm_odd_bytes",
        "gauge",
        'Help with "quotes", a backslash \\ and\na newline.',
        [({"mountpoint": '/mnt/we"ird\\path\nx'}, 1), ({"mountpoint": "/é ü"}, 2)],
    )
    text += family("rawvm_things_total", "counter", "Things.", [({}, 7)])
    result = promtool_check(text)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_really_rejects_a_broken_page() -> None:
    """The check above could not pass by accident: promtool fails a page with a bad escape."""
    result = promtool_check('# HELP rawvm_x_bytes X.\n# TYPE rawvm_x_bytes gauge\nrawvm_x_bytes{a="b"c"} 1\n')
    assert result.returncode != 0
