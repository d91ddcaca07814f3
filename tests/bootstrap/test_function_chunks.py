"""f.map's chunks: the sizer's choices from measured call and round-trip times, and the worker's side of a chunk
(results in order, each call's error its own)."""

from __future__ import annotations

import pickle

import cloudpickle
from rawvm.functions.chunks import MAX_CHUNK_BYTES, ChunkSizer, encode_chunk
from rawvm.functions.results import RemoteTraceback, decode_result
from rawvm_agent.call_worker import ERROR, OK, run_call


def test_probes_first_then_big_chunks_for_tiny_calls() -> None:
    sizer = ChunkSizer()
    assert sizer.size(10_000, 2) == 1  # nothing known: a probe
    sizer.observe(calls=1, compute_s=1e-7, wall_s=0.003)  # a round trip of 3 ms, 0.1 us of work
    assert sizer.size(10_000, 2) == 10_000  # the whole map takes less than a round trip: one chunk
    assert sizer.size(7, 2) == 7


def test_long_calls_go_one_to_a_chunk() -> None:
    sizer = ChunkSizer()
    sizer.not_tiny()  # no probe back within PROBE_WAIT_S
    assert sizer.size(1000, 8) == 1
    sizer.observe(calls=1, compute_s=2.0, wall_s=2.004)
    assert sizer.size(1000, 8) == 1


def test_middling_calls_amortize_the_round_trip_and_leave_work_for_every_worker() -> None:
    sizer = ChunkSizer()
    sizer.observe(calls=10, compute_s=0.01, wall_s=0.015)  # 1 ms a call, 5 ms round trip
    assert sizer.size(100_000, 4) == 40  # 8 round trips of work
    sizer = ChunkSizer()
    sizer.observe(calls=100, compute_s=1e-4, wall_s=0.0051)  # 1 us a call: amortizing wants 40 000
    assert sizer.size(100_000, 16) == 10_000  # a quarter of that at least, though balance would say 3125
    assert sizer.size(200_000, 2) == 40_000  # balance would allow 50 000


def test_the_least_recent_round_trip_counts_and_may_rise_slowly() -> None:
    sizer = ChunkSizer()
    sizer.observe(calls=1, compute_s=0.0, wall_s=0.004)
    sizer.observe(calls=1, compute_s=0.0, wall_s=0.050)  # queued behind other chunks: not the round trip
    assert sizer.latency_s is not None and 0.004 <= sizer.latency_s <= 0.004 * 1.25


def test_big_items_keep_a_chunk_under_its_byte_limit() -> None:
    sizer = ChunkSizer(per_call_s=1e-6, latency_s=0.01, item_bytes=1 << 20)
    assert sizer.size(1000, 1) == MAX_CHUNK_BYTES >> 20


def test_a_chunk_runs_each_item_and_keeps_each_error_with_its_call() -> None:
    def flaky(x: int) -> int:
        if x % 3 == 0:
            raise ValueError(f"no {x}")
        return x * 10

    blob = cloudpickle.dumps(flaky)
    status, payload = run_call(cloudpickle, encode_chunk(blob, [1, 2, 3, 4, 6], cloudpickle.dumps, True), {})
    assert status == OK
    seconds, values, errors = pickle.loads(payload)
    assert seconds >= 0
    assert values == [10, 20, None, 40, None]
    assert [index for index, _ in errors] == [2, 4]
    ok, exc = decode_result(cloudpickle.loads, ERROR, errors[0][1])
    assert not ok and isinstance(exc, ValueError) and str(exc) == "no 3"
    remote = exc.__cause__
    assert isinstance(remote, RemoteTraceback)
    assert "in flaky" in remote.text and "run_chunk" not in remote.text


def test_a_chunk_of_objects_comes_back_through_cloudpickle() -> None:
    class Point:
        def __init__(self, x: int) -> None:
            self.x = x

    blob = cloudpickle.dumps(lambda p: Point(p.x + 1))
    status, payload = run_call(cloudpickle, encode_chunk(blob, [Point(1), Point(2)], cloudpickle.dumps, False), {})
    assert status == OK
    _, values, errors = cloudpickle.loads(payload)
    assert [v.x for v in values] == [2, 3] and errors == []


def test_a_function_that_does_not_unpickle_fails_the_whole_chunk() -> None:
    status, payload = run_call(cloudpickle, encode_chunk(b"not a pickle", [1, 2], cloudpickle.dumps, True), {})
    assert status == ERROR
    ok, _ = decode_result(cloudpickle.loads, status, payload)
    assert not ok
