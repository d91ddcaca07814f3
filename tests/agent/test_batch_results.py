"""A batch machine's results on its disk (rawvm_agent/batch_results.py): lines appended to segments, a new segment
after each flush, torn lines skipped, the old one-file-per-result layout still read."""

from __future__ import annotations

import json
from pathlib import Path

from rawvm_agent.batch_results import ResultLog, read_results, read_segment


def result(bid: int) -> dict[str, object]:
    return {"id": bid, "state": "done", "exit_code": 0, "attempts": [], "machine": "m0", "ended_at": float(bid)}


def test_each_flush_closes_a_segment_that_never_changes_again(tmp_path: Path) -> None:
    log = ResultLog(tmp_path / "results")
    assert log.close_segment() is None  # nothing written yet: nothing to flush
    for bid in range(3):
        log.append(result(bid))
    first = log.close_segment()
    assert first is not None and [r["id"] for r in read_segment(first)] == [0, 1, 2]
    frozen = first.read_bytes()
    for bid in range(3, 1003):  # a thousand more, still one file for them
        log.append(result(bid))
    second = log.close_segment()
    assert second is not None and second != first and first.read_bytes() == frozen
    assert [r["id"] for r in read_results(tmp_path / "results")] == list(range(1003))
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["000000.jsonl", "000001.jsonl"]


def test_a_restart_reads_every_segment_skips_a_torn_line_and_writes_a_new_segment(tmp_path: Path) -> None:
    directory = tmp_path / "results"
    log = ResultLog(directory)
    log.append(result(0))
    log.close_segment()
    log.append(result(1))
    log.close()
    with (directory / "000001.jsonl").open("a") as torn:  # the power went during the next write
        torn.write(json.dumps(result(2))[:20])
    again = ResultLog(directory)
    assert [r["id"] for r in again.load()] == [0, 1]
    again.append(result(2))
    again.close()
    assert (directory / "000002.jsonl").is_file()  # not appended after the torn line
    assert [r["id"] for r in read_results(directory)] == [0, 1, 2]


def test_readers_take_the_one_file_per_result_layout_of_older_agents(tmp_path: Path) -> None:
    directory = tmp_path / "results"
    directory.mkdir()
    (directory / "7.json").write_text(json.dumps(result(7)))
    (directory / "8.json").write_text("{not json")
    (directory / "000000.jsonl").write_text(json.dumps(result(1)) + "\n" + json.dumps(["not", "a", "result"]) + "\n")
    assert [r["id"] for r in read_results(directory)] == [1, 7]
    assert list(read_results(tmp_path / "missing")) == []
