"""Small rules of the front door: cluster records, output prefixing, exit codes, cost, progress lines."""

from __future__ import annotations

import io
import json
import stat
from pathlib import Path

import pytest
from rawvm import api, clusters, costs, options, session
from rawvm import launch as launching
from rawvm.errors import RawvmError, UsageError
from rawvm.progress import PlainProgress, install_detail
from rawvm.providers.base import Machine


@pytest.fixture(autouse=True)
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RAWVM_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


def machine(i: int, price: float = 0.0, launched_at: float = 1000.0) -> Machine:
    return Machine(
        id=f"c-m{i}",
        provider="aws",
        cluster="c",
        agent_url=f"http://h{i}:8470",
        price_per_hour=price,
        launched_at=launched_at,
        details={"pid": "1"},
    )


def test_cluster_records_round_trip_and_are_private(state: Path) -> None:
    record = clusters.ClusterRecord(name="c", provider="local", token="secret-token", machines=[machine(0)])
    path = clusters.save(record)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "clusters").stat().st_mode) == 0o700
    assert clusters.load("c") == record
    assert [r.name for r in clusters.all_records()] == ["c"]
    assert "secret-token" not in repr(record)
    clusters.remove("c")
    with pytest.raises(RawvmError, match="no cluster named 'c' here"):
        clusters.load("c")


def test_a_damaged_record_is_named_and_does_not_hide_others(state: Path) -> None:
    clusters.save(clusters.ClusterRecord(name="good", provider="local", token="t"))
    (state / "clusters" / "bad.json").write_text("{not json")
    with pytest.raises(RawvmError, match="damaged"):
        clusters.load("bad")
    assert [r.name for r in clusters.all_records()] == ["good"]


@pytest.mark.parametrize("name", ["", "UPPER", "a b", "../x", "a" * 41, "-lead"])
def test_bad_cluster_names(name: str) -> None:
    with pytest.raises(UsageError, match="invalid cluster name"):
        clusters.check_name(name)


def test_new_names_are_valid_and_distinct() -> None:
    names = {clusters.new_name() for _ in range(50)}
    assert len(names) == 50
    assert all(clusters.check_name(n) for n in names)


def test_one_machine_streams_raw_text_across_chunk_and_utf8_boundaries() -> None:
    out = io.StringIO()
    writer = session.StreamWriter(out, "")
    data = "héllo\nwörld".encode()
    for i in range(len(data)):
        writer.write(data[i : i + 1])
    writer.close()
    assert out.getvalue() == "héllo\nwörld"


def test_several_machines_get_whole_prefixed_lines() -> None:
    out = io.StringIO()
    writer = session.StreamWriter(out, "[m1] ")
    writer.write(b"par")
    assert out.getvalue() == ""  # no half lines: machines' output would interleave mid-line
    writer.write(b"tial\nnext\n\nlast")
    writer.close()
    assert out.getvalue() == "[m1] partial\n[m1] next\n[m1] \n[m1] last\n"


@pytest.mark.parametrize(
    ("record", "code"),
    [({"exit_code": 0}, 0), ({"exit_code": 3}, 3), ({"exit_code": -9}, 137), ({"exit_code": None}, 1), ({}, 1)],
)
def test_task_exit_codes(record: dict[str, object], code: int) -> None:
    assert session.task_exit_code(record) == code


def test_cost_is_price_times_wall_time_per_machine() -> None:
    record = clusters.ClusterRecord(
        name="c", provider="aws", token="t", machines=[machine(0, 0.36, 1000.0), machine(1, 0.72, 1000.0 + 1800)]
    )
    assert costs.cost_of(record, until=1000.0 + 3600) == pytest.approx(0.36 + 0.36)
    assert record.price_per_hour == pytest.approx(1.08)


@pytest.mark.parametrize(("argv", "expected"), [(["--", "python", "x.py"], ["python", "x.py"]), (["ls"], ["ls"])])
def test_the_command_after_the_double_dash(argv: list[str], expected: list[str]) -> None:
    assert options.check_command(argv) == expected


def test_ca_certs_must_be_pem(tmp_path: Path) -> None:
    pem = tmp_path / "ca.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    assert options.check_ca_certs([pem]) == (pem.resolve(),)
    (tmp_path / "key.txt").write_text("not a cert")
    with pytest.raises(UsageError, match="not a readable PEM certificate"):
        options.check_ca_certs([tmp_path / "key.txt"])


def test_plain_progress_prints_one_line_per_phase_change() -> None:
    out = io.StringIO()
    view = PlainProgress(out)
    for phase in ("booting", "booting", "installing", "installing", "ready"):
        view.update("m0", phase, "sync 1/2 packages")
    view.update("m1", "failed", "sha256 mismatch")
    lines = [line.rsplit(" (", 1)[0] for line in out.getvalue().splitlines()]
    assert lines == [
        "rawvm: m0 booting",
        "rawvm: m0 installing",
        "rawvm: m0 ready",
        "rawvm: m1 failed: sha256 mismatch",
    ]


def test_install_detail() -> None:
    assert install_detail({"install": {"step": "sync", "packages_total": 40, "packages_done": 12}}) == (
        "sync 12/40 packages"
    )
    assert install_detail({"install": {"step": "fetch", "files_total": 4, "files_done": 1, "bytes_done": 3 << 20}}) == (
        "fetch 1/4 files, 3.0 MiB"
    )
    assert install_detail({}) == ""


def test_ls_json_counts_running_machines() -> None:
    views = [api.ClusterView("c", "local", 1.0, [{"id": "c-m0", "state": "running"}], 0.0)]
    (row,) = json.loads(api.ls_json(views))
    assert row["running"] == 1 and row["name"] == "c"


def test_lock_summary_counts_what_changed() -> None:
    from rawvm_resolver.report import ReportRow

    rows = [
        ReportRow("a", "kept", "1", "1", ""),
        ReportRow("appnope", "dropped", "0.1", "", "macOS only"),
        ReportRow("b", "translated", "1", "1", ""),
        ReportRow("c", "translated", "1", "1", ""),
    ]
    assert launching.lock_summary(rows) == "1 dropped, 2 translated"
    assert launching.lock_summary(rows[:1]) == ""


def test_rich_progress_shows_each_machine_and_its_phase() -> None:
    from rawvm.progress import RichProgress

    out = io.StringIO()
    view = RichProgress(out)
    view.update("m0", "installing", "sync 1/2 packages")
    view.update("m1", "booting")
    view.update("m0", "ready")
    view.close()
    text = out.getvalue()
    assert "m0" in text and "m1" in text and "ready" in text and "booting" in text


def test_ls_releases_a_finished_clusters_provider_resources_before_forgetting_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cluster whose machines all stopped by themselves is forgotten by 'rawvm ls', and its provider's leftovers
    (here the real local provider's staged files; on aws the security group and launch template) go with it."""
    import tempfile
    import time

    from rawvm.providers.local import default_root

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    cluster_dir = default_root() / "old"
    (cluster_dir / "staged").mkdir(parents=True)
    (cluster_dir / "staged" / "pylock.toml").write_text("")
    gone = Machine(id="old-m0", provider="local", cluster="old", agent_url="http://127.0.0.1:1", details={"pid": "0"})
    clusters.save(clusters.ClusterRecord(name="old", provider="local", token="t", machines=[gone], created=0.0))
    recent = clusters.ClusterRecord(name="new", provider="local", token="t", machines=[gone], created=time.time())
    clusters.save(recent)

    names = [view.name for view in api.ls()]
    assert names == ["new"]  # a just-launched cluster may not have machines yet: kept
    assert not cluster_dir.exists()
    with pytest.raises(RawvmError):
        clusters.load("old")
