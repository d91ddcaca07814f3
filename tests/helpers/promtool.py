"""``promtool check metrics`` on a page, the way Prometheus itself would read it."""

from __future__ import annotations

import subprocess

from tests.systools import need_tool

# What promtool says of dcgm-exporter's own page: the camelCase modelName label, and a counter not ending in _total.
DCGM_EXPORTER_FINDINGS = {
    "label names should be written in 'snake_case' not 'camelCase'",
    'counter metrics should have "_total" suffix',
}


def promtool_findings(text: str) -> set[str]:
    """The lint findings of a page promtool parses (exit 3: findings only; 1 would be a parse error)."""
    promtool = need_tool("promtool", "prometheus")
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode in (0, 3), result.stdout + result.stderr
    return {line.split(" ", 1)[1] for line in (result.stdout + result.stderr).splitlines() if line.strip()}
