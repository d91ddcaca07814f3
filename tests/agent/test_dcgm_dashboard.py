"""NVIDIA's own dcgm-exporter Grafana dashboard, every panel, against a real Prometheus scraping a real agent.

The dashboard is ``tests/data/dcgm-exporter/dcgm-exporter-dashboard.json``, copied verbatim from NVIDIA/dcgm-exporter
(see the SOURCE file beside it). The agent runs on the fake NVML library with 8 Hopper-class GPUs (GPM included,
so "Tensor Core Utilization" has ``DCGM_FI_PROF_PIPE_TENSOR_ACTIVE``). A real Prometheus scrapes it four ways, each
under its own ``instance`` label so one dashboard variable picks one way:

- ``metrics``: ``/metrics`` alone;
- ``dcgm``: ``/metrics/dcgm`` alone;
- ``both``: both pages, ``/metrics`` with the README's ``metric_relabel_configs`` that drops its ``DCGM_*`` series;
- ``naive``: both pages as they are, which counts every GPU twice (what the README warns about).

The template variables are resolved as Grafana does: their ``label_values(...)`` queries go to Prometheus, ``$gpu``
takes Grafana's "All" for a multi-value variable (``(0|1|…)``), ``$instance`` the one way under test. Every panel
must return data for the first three ways, and the sums must count each GPU once.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pynvml
import pytest
from aiohttp import ClientSession

from tests.agent.core_helpers import TOKEN
from tests.agent.test_metrics_prometheus import (  # noqa: F401  (prometheus_server is a fixture)
    SCRAPE_WAIT_S,
    ServerFactory,
    prometheus_server,
    serve_agent,
)
from tests.agent.test_nvml_fakelib import FakeNvmlLib, eight_gpm_gpus, gpm_values, installed

DASHBOARD = Path(__file__).resolve().parent.parent / "data" / "dcgm-exporter" / "dcgm-exporter-dashboard.json"
WAYS = ("metrics", "dcgm", "both")
# The README's advice for scraping both pages: drop /metrics's copy of the DCGM series.
DROP_DCGM = """
    metric_relabel_configs:
      - source_labels: [__name__]
        regex: "DCGM_.*"
        action: drop"""


def scrape_config(agent_port: int) -> str:
    jobs = [
        ("metrics", "/metrics", "metrics", ""),
        ("dcgm", "/metrics/dcgm", "dcgm", ""),
        ("both-rawvm", "/metrics", "both", DROP_DCGM),
        ("both-dcgm", "/metrics/dcgm", "both", ""),
        ("naive-rawvm", "/metrics", "naive", ""),
        ("naive-dcgm", "/metrics/dcgm", "naive", ""),
    ]
    text = "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n"
    for job, path, instance, extra in jobs:
        text += f"""  - job_name: {job}
    metrics_path: {path}
    authorization:
      type: Bearer
      credentials: "{TOKEN}"
    static_configs:
      - targets: ["127.0.0.1:{agent_port}"]
        labels:
          instance: {instance}{extra}
"""
    return text


def panel_targets(dashboard: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(panel title, target) for every query of every panel, rows' nested panels included."""
    out = []
    panels = list(dashboard["panels"])
    while panels:
        panel = panels.pop(0)
        panels.extend(panel.get("panels", []))
        out.extend((panel["title"], target) for target in panel.get("targets", []))
    return out


def regex_escape(value: str) -> str:
    """Grafana's escaping of a variable value inside a Prometheus regex matcher."""
    return re.sub(r"([\\^$*+?.()|{}\[\]])", r"\\\\\1", value)


def grafana_all(values: list[str]) -> str:
    """A multi-value variable set to "All" without a custom all-value: every value, as a regex alternation."""
    escaped = [regex_escape(v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def substitute(expr: str, values: dict[str, str]) -> str:
    """``$name`` and ``${name}`` replaced; a variable the test does not know fails loudly (KeyError)."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], expr)


class PromApi:
    def __init__(self, http: ClientSession, base: str) -> None:
        self.http, self.base = http, base

    async def get(self, path: str, **params: str) -> Any:
        async with self.http.get(f"{self.base}{path}", params=params) as resp:
            body = await resp.json()
        assert body["status"] == "success", body
        return body["data"]

    async def instant(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = (await self.get("/api/v1/query", query=expr))["result"]
        return result

    async def label_values(self, query: str) -> list[str]:
        """Grafana's ``label_values(metric, label)`` variable query, as the Prometheus data source runs it."""
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
        assert m, f"unexpected variable query {query!r}"
        values: list[str] = await self.get(f"/api/v1/label/{m.group(2)}/values", **{"match[]": m.group(1)})
        return values


async def wait_for_scrapes(api: PromApi) -> None:
    """Until every way has all 8 GPUs' tensor series (GPM needs two agent samples) and the naive way twice that."""
    want = {"metrics": 8, "dcgm": 8, "both": 8, "naive": 16}
    seen: dict[str, float] = {}
    deadline = time.monotonic() + SCRAPE_WAIT_S
    while time.monotonic() < deadline:
        try:
            rows = await api.instant("count by (instance) (DCGM_FI_PROF_PIPE_TENSOR_ACTIVE)")
        except (OSError, AssertionError, ValueError):
            rows = []  # Prometheus is not listening yet, or not ready
        seen = {r["metric"]["instance"]: float(r["value"][1]) for r in rows}
        if seen == want:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"tensor series per instance: {seen}, want {want}")


@pytest.mark.slow
async def test_every_dashboard_panel_returns_data(
    aiohttp_server: ServerFactory,
    prometheus_server: Callable[..., Awaitable[str]],  # noqa: F811
    tmp_path: Path,
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    targets = panel_targets(dashboard)
    assert len({title for title, _ in targets}) == 8  # the dashboard as copied: 8 panels, one query each
    with installed(eight_gpm_gpus()) as fake:
        server = await serve_agent(aiohttp_server, tmp_path / "state")
        assert server.port is not None
        base = await prometheus_server(server.port, scrape_config(server.port))
        async with ClientSession() as http:
            api = PromApi(http, base)
            await wait_for_scrapes(api)
            variables = {v["name"]: v for v in dashboard["templating"]["list"] if v["type"] == "query"}
            assert set(variables) == {"instance", "gpu"}
            instances = await api.label_values(variables["instance"]["query"])
            gpus = await api.label_values(variables["gpu"]["query"])
            assert set(instances) == {*WAYS, "naive"}
            assert sorted(gpus, key=int) == [str(i) for i in range(8)]
            for way in WAYS:
                values = {"instance": regex_escape(way), "gpu": grafana_all(gpus)}
                results = {}
                for title, target in targets:
                    expr = substitute(target["expr"], values)
                    rows = await api.instant(expr)
                    assert rows, f"{way}: panel {title!r} returns no data: {expr}"
                    if not target.get("instant"):  # a time series panel asks for a range
                        end = time.time()
                        ranged = await api.get(
                            "/api/v1/query_range", query=expr, start=str(end - 30), end=str(end), step="1"
                        )
                        assert ranged["result"], f"{way}: panel {title!r} returns no range: {expr}"
                    results[title] = rows
                check_values(way, results, fake)
            # Both pages as they are: every GPU twice, the power total doubled.
            naive = await api.instant('sum(DCGM_FI_DEV_POWER_USAGE{instance=~"naive"})')
            assert float(naive[0]["value"][1]) == pytest.approx(2 * power_total(fake))


def power_total(fake: FakeNvmlLib) -> float:
    return sum(g.power_mw / 1000 for g in fake.gpus if g.power_mw is not None)


def check_values(way: str, results: dict[str, list[dict[str, Any]]], fake: FakeNvmlLib) -> None:
    """The panels' figures are the fake GPUs' readings, each GPU counted once."""

    def by_gpu(title: str) -> dict[str, float]:
        rows = results[title]
        out = {r["metric"]["gpu"]: float(r["value"][1]) for r in rows}
        assert len(out) == len(rows), f"{way}: {title}: a GPU appears twice"
        return out

    tensor = by_gpu("Tensor Core Utilization")
    assert tensor == {
        str(i): pytest.approx(gpm_values(i)[pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL] / 100) for i in range(8)
    }
    assert by_gpu("GPU Temperature") == {str(i): g.temperature_c for i, g in enumerate(fake.gpus)}
    assert by_gpu("GPU Utilization") == {str(i): g.util_gpu for i, g in enumerate(fake.gpus)}
    total = float(results["GPU Power Total"][0]["value"][1])
    assert total == pytest.approx(power_total(fake)), f"{way}: power counted {total / power_total(fake):.1f} times"
    average = float(results["GPU Avg. Temp"][0]["value"][1])
    assert average == pytest.approx(sum(g.temperature_c or 0 for g in fake.gpus) / 8)
