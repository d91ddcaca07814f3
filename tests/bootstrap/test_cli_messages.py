"""The CLI's words: every command explains itself, a mistyped name or value is one line, and ``--json`` keeps
its types (a price is a number or null)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from rawvm import clusters
from rawvm.cli import build_parser, main
from rawvm.clusters import ClusterRecord
from rawvm.commands import ClusterView, ls_json
from rawvm.providers.base import Machine

from tests.helpers.local import isolate_state


@pytest.fixture(autouse=True)
def isolated_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return isolate_state(tmp_path, monkeypatch)


def parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every parser below it (subcommands, sub-subcommands)."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from parsers(child)


def test_every_command_and_subcommand_has_a_description() -> None:
    missing = [p.prog for p in parsers(build_parser()) if not (p.description or "").strip()]
    assert not missing, f"no description: {missing}"


def one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int | str | None, str]:
    rc: int | str | None
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return rc, lines[0]


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--keepalive", "-5m", "--", "true"],
        ["run", "--keepalive=-5m", "--", "true"],
        ["up", "--max-lifetime", "-1h"],
        ["batch", "run", "--array", "0-1", "--task-timeout", "-1h", "--", "true"],
        ["dask", "up", "--keepalive", "-30s"],
    ],
    ids=" ".join,
)
def test_a_negative_duration_gets_the_duration_message(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    rc, line = one_line_error(argv, capsys)
    assert rc == 2
    assert "is not a duration: use e.g. 90s, 20m" in line, line
    assert "expected one argument" not in line


def test_a_negative_value_after_the_command_is_the_commands_own() -> None:
    args = build_parser().parse_args(["run", "--keepalive", "-5m", "--", "sleep", "--keepalive", "-5m", "-x"])
    assert args.keepalive == "-5m"
    assert args.cmd == ["--", "sleep", "--keepalive", "-5m", "-x"]
    assert build_parser().parse_args(["top", "--interval", "-1"]).interval == -1.0  # and gets its own message


def record(name: str, provider: str = "local", prices: tuple[float, ...] = (0.0,)) -> ClusterRecord:
    machines = [Machine(f"{name}-m{i}", provider, name, "", price_per_hour=p) for i, p in enumerate(prices)]
    return ClusterRecord(name=name, provider=provider, token="x", created=1.0, machines=machines)


def test_a_mistyped_cluster_is_one_line_naming_those_that_exist(capsys: pytest.CaptureFixture[str]) -> None:
    rc, line = one_line_error(["run", "--cluster", "nosuch", "--", "true"], capsys)
    assert rc == 2
    assert line == (
        "rawvm: --cluster nosuch: no such cluster (there are no clusters here; see 'rawvm ls'); "
        "a new cluster is named with --name"
    )
    clusters.save(record("alpha"))
    clusters.save(record("beta"))
    for argv in (["run", "--cluster", "alpah", "--", "true"], ["up", "--cluster", "alpah"]):
        rc, line = one_line_error(argv, capsys)
        assert rc == 2
        assert "no such cluster (clusters here: alpha, beta; see 'rawvm ls')" in line


def test_name_must_be_new_and_not_given_with_cluster(capsys: pytest.CaptureFixture[str]) -> None:
    clusters.save(record("alpha"))
    rc, line = one_line_error(["run", "--name", "alpha", "--", "true"], capsys)
    assert (rc, line) == (2, "rawvm: --name alpha: a cluster of that name exists; run on it with --cluster alpha")
    rc, line = one_line_error(["up", "--name", "x", "--cluster", "alpha"], capsys)
    assert (rc, line) == (2, "rawvm: give --cluster (an existing cluster) or --name (a new one), not both")
    for command in (["run"], ["up"], ["batch", "run"], ["dask", "up"]):
        args = build_parser().parse_args([*command, "--name", "fresh", "--", "true"][: len(command) + 2])
        assert args.name == "fresh"


def test_ls_json_prices_are_numbers_or_null() -> None:
    views = [
        ClusterView("free", "local", 1.0, [{"id": "m0", "price_per_hour": 0.0, "state": "running"}], 0.0),
        ClusterView("priced", "aws", 1.0, [{"id": "m0", "price_per_hour": 0.5, "state": "running"}], 0.5, 0.25),
        ClusterView("unpriced", "aws", 1.0, [{"id": "m0", "price_per_hour": None, "state": "running"}], 0.0),
        ClusterView(
            "partly",
            "aws",
            1.0,
            [
                {"id": "m0", "price_per_hour": 0.5, "state": "running"},
                {"id": "m1", "price_per_hour": None, "state": "running"},
            ],
            0.5,
            0.25,
            price_unknown=True,
        ),
    ]
    rows = {row["name"]: row for row in json.loads(ls_json(views))}
    assert (rows["free"]["price_per_hour"], rows["free"]["cost_so_far"]) == (0.0, 0.0)
    assert (rows["priced"]["price_per_hour"], rows["priced"]["cost_so_far"]) == (0.5, 0.25)
    assert (rows["unpriced"]["price_per_hour"], rows["unpriced"]["cost_so_far"]) == (None, None)
    assert (rows["partly"]["price_per_hour"], rows["partly"]["cost_so_far"]) == (None, None)
    for row in rows.values():
        for machine in row["machines"]:
            assert machine["price_per_hour"] is None or isinstance(machine["price_per_hour"], float)


def test_ls_json_machine_prices_from_records(capsys: pytest.CaptureFixture[str]) -> None:
    from rawvm.commands import known_price

    assert known_price("local", 0.0) == 0.0
    assert known_price("aws", 0.0) is None
    assert known_price("aws", 0.096) == 0.096


def test_top_json_with_no_clusters_is_an_empty_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["top", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
