"""``rawvm batch`` input: task ids and values, script header options (flags win), and bad input as one clear
line before anything is locked or launched."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from rawvm.batches import plan as batch_plan
from rawvm.cli import build_parser, main
from rawvm.cli.batch import _with_header_options
from rawvm.errors import UsageError


@pytest.fixture(autouse=True)
def isolated_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RAWVM_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_arrays_ranges_and_lists() -> None:
    assert batch_plan.parse_array("0-3") == [0, 1, 2, 3]
    assert batch_plan.parse_array("1,4-6") == [1, 4, 5, 6]
    assert batch_plan.parse_array("7") == [7]
    assert batch_plan.compress_ids([9, 1, 4, 5, 6]) == "1,4-6,9"


def test_maps_number_their_values_from_0(tmp_path: Path) -> None:
    (tmp_path / "files.txt").write_text("a.parquet\n\nb.parquet\n  c.parquet  \n")
    assert batch_plan.tasks_of(None, tmp_path / "files.txt", None) == (
        [0, 1, 2],
        ["a.parquet", "b.parquet", "c.parquet"],
    )
    assert batch_plan.tasks_of(None, None, "x,y") == ([0, 1], ["x", "y"])
    assert batch_plan.tasks_of("2-3", None, None) == ([2, 3], None)


def test_as_many_machines_as_the_tasks_can_use() -> None:
    assert batch_plan.machines_needed(50, 3, 2) == 3
    assert batch_plan.machines_needed(4, 10, 2) == 2
    assert batch_plan.machines_needed(3, 10, 0) == 3  # K unknown (the machine's cores): one task each at most
    assert batch_plan.machines_needed(1000, 100, 4) == 100


CASES = [
    (["--array", "5-2"], "runs backwards"),
    (["--array", "a-b"], "use ids and ranges like 0-999"),
    (["--array", "1,1"], "appears twice"),
    ([], "give exactly one of --array, --map-over-file, --map-over-values"),
    (["--array", "1", "--map-over-values", "a"], "give exactly one of"),
    (["--map-over-values", "a,,b"], "an empty value"),
    (["--map-over-file", "/nonexistent"], "--map-over-file /nonexistent: cannot read it"),
    (["--array", "0-3", "--task-timeout", "soon"], "--task-timeout 'soon' is not a duration"),
    (["--array", "0-3", "--max-retries", "-1"], "--max-retries must not be negative"),
    (["--array", "0-3", "-n", "0"], "-n 0"),
]


@pytest.mark.parametrize(("flags", "message"), CASES, ids=[" ".join(c[0]) or "none" for c in CASES])
def test_bad_input_is_one_line_and_nothing_launches(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str], isolated_state: Path
) -> None:
    assert main(["batch", "run", *flags, "--", "true"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rawvm: ") and message in lines[0], lines
    assert not list((isolated_state / "tmp").iterdir())  # nothing locked, staged or launched


def test_status_of_an_unknown_batch(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["batch", "status", "nosuch"]) == 1
    assert capsys.readouterr().err.strip() == "rawvm: no batch named 'nosuch' here: see 'rawvm ls'"


def test_script_header_lines_are_options_and_explicit_flags_win(tmp_path: Path) -> None:
    (tmp_path / "job.py").write_text(
        "#!/usr/bin/env python\n# rawvm: --gpu -n 10\n# rawvm: --max-retries 5 --keepalive 5m\n"
        "import os\n# rawvm: -n 99\n"
    )
    parser = build_parser()
    args = parser.parse_args(["batch", "run", "--array", "0-9", "-n", "3", "--", "python", "job.py"])
    merged = _with_header_options(args.parser, args)
    assert merged.gpu is True and merged.max_retries == 5 and merged.keepalive == "5m"
    assert merged.n == 3  # the flag wins; the line after the first code line is not a header
    args = parser.parse_args(["batch", "run", "--array", "0-9", "--", "python", "job.py"])
    assert _with_header_options(args.parser, args).n == 10


def test_a_bad_header_line_names_the_script(tmp_path: Path) -> None:
    (tmp_path / "job.sh").write_text("# rawvm: --cluster 'unclosed\necho hi\n")
    with pytest.raises(UsageError, match=r"job.sh: bad '# rawvm:' line"):
        batch_plan.header_options(["bash", "job.sh"], tmp_path)


def test_progress_counts_stay_consistent_when_a_task_ends_between_two_reads() -> None:
    """The watch reads a machine's status, then its results: a task can be running in the first and done in the
    second. Its result wins, so the counts still add up to the number of tasks."""
    from rawvm.batches.watch import BatchProgress, Watcher

    spec = batch_plan.make_spec(
        ["true"], [0, 1, 2, 3], None, machines=1, tasks_per_machine=2, max_retries=0, task_timeout_s=0, gpu=False
    )
    watcher = Watcher(spec, {}, {}, None)
    watcher.results = {i: {"id": i, "state": "done"} for i in range(4)}
    watcher.running = {"m0": {3}}
    assert watcher.counts() == {"done": 4, "failed": 0, "running": 0, "queued": 0}
    assert BatchProgress.line(watcher.counts()) == "done 4 running 0 failed 0 queued 0"
    watcher.results.pop(3)
    watcher.results[2]["state"] = "failed"
    assert watcher.counts() == {"done": 2, "failed": 1, "running": 1, "queued": 0}
