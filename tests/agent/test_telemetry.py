"""Telemetry on this machine's real /proc: collectors, the ring, the on-disk store, the sampler loop."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from pathlib import Path

import msgpack
import psutil
import pytest
from rawvm_agent.config import TelemetryConfig
from rawvm_agent.telemetry import Sampler
from rawvm_agent.telemetry.collectors import cpu, processes
from rawvm_agent.telemetry.ring import Ring, Summary
from rawvm_agent.telemetry.sample import array_header, pack, unpack
from rawvm_agent.telemetry.store import Store, segment_name


def test_a_sample_has_every_collector_with_real_values(tmp_path: Path) -> None:
    s = Sampler(TelemetryConfig(), tmp_path)
    sample = s.sample_once()
    assert sample["seq"] == 1 and abs(sample["t"] - time.time()) < 60
    assert "errors" not in sample
    assert set(sample) >= {"cpu", "memory", "disk", "network", "load", "processes", "gpu"}
    assert sample["cpu"]["cores"] == psutil.cpu_count() == len(sample["cpu"]["per_core_percent"])
    assert 0.0 <= sample["cpu"]["percent"] <= 100.0
    assert all(0.0 <= p <= 100.0 for p in sample["cpu"]["per_core_percent"])
    assert sample["memory"]["total_bytes"] == psutil.virtual_memory().total
    root = [fs for fs in sample["disk"]["filesystems"] if fs["mountpoint"] == "/"]
    assert root and root[0]["size_bytes"] == psutil.disk_usage("/").total
    assert "lo" in sample["network"]
    assert sample["processes"]["count"] >= 1 and sample["processes"]["threads"] >= sample["processes"]["running"] >= 1
    assert set(sample["load"]) == {"load1", "load5", "load15"}
    s.close()


def test_cpu_percent_follows_a_busy_core() -> None:
    collector = cpu.CpuCollector()
    collector.collect()
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        pass  # keep one core busy
    busy = collector.collect()
    assert max(busy["per_core_percent"]) > 40.0  # one core spun for the whole interval
    assert busy["percent"] > 100.0 / (psutil.cpu_count() or 1) * 0.4


def test_a_failing_collector_fails_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The processes collector's real source disappears (a missing /proc/loadavg): only its key goes."""
    monkeypatch.setattr(processes, "LOADAVG", tmp_path / "no-such-loadavg")
    s = Sampler(TelemetryConfig(), tmp_path / "state")
    sample = s.sample_once()
    assert "processes" not in sample
    assert sample["errors"]["processes"].startswith("FileNotFoundError")
    assert {"cpu", "memory", "disk", "network", "load", "gpu"} <= set(sample)
    text = s.render_prometheus()
    assert 'rawvm_telemetry_collector_success{collector="processes"} 0' in text
    assert 'rawvm_telemetry_collector_success{collector="cpu"} 1' in text
    assert "rawvm_processes " not in text and "rawvm_memory_total_bytes " in text
    s.close()


def test_cpu_percent_is_none_while_the_cpu_collector_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """/proc/stat unreadable (injected at psutil, the collector's source): the idle logic gets None, not 0."""
    s = Sampler(TelemetryConfig(), tmp_path)
    s.sample_once()
    assert s.cpu_percent(60) is not None

    def unreadable(percpu: bool = False) -> None:
        raise PermissionError("/proc/stat")

    monkeypatch.setattr(psutil, "cpu_times", unreadable)
    sample = s.sample_once()
    assert "cpu" not in sample and "cpu" in sample["errors"]
    assert s.cpu_percent(60) is None
    s.close()


def test_cpu_percent_is_the_mean_over_the_window(tmp_path: Path) -> None:
    s = Sampler(TelemetryConfig(), tmp_path)
    samples = [s.sample_once() for _ in range(4)]
    expected = sum(x["cpu"]["percent"] for x in samples) / 4
    assert s.cpu_percent(3600) == pytest.approx(expected)
    assert s.cpu_percent(0.0) == samples[-1]["cpu"]["percent"]  # a window shorter than a tick: the newest
    assert s.gpu_utilization(60) == [] and s.gpu_count == 0
    s.close()


def test_no_samples_yet(tmp_path: Path) -> None:
    s = Sampler(TelemetryConfig(), tmp_path)
    assert s.latest() is None and s.samples_after(0) == [] and s.cpu_percent(30) is None
    assert "rawvm_telemetry_collector_success" in s.render_prometheus()
    s.close()


def test_samples_after_pages_by_seq(tmp_path: Path) -> None:
    s = Sampler(TelemetryConfig(), tmp_path)
    for _ in range(5):
        s.sample_once()
    assert [x["seq"] for x in s.samples_after(0)] == [1, 2, 3, 4, 5]
    assert [x["seq"] for x in s.samples_after(2, limit=2)] == [3, 4]
    assert s.samples_after(5) == []
    assert s.latest() == s.samples_after(4)[0]
    assert msgpack.unpackb(s.samples_after_msgpack(1), raw=False) == s.samples_after(1)
    # newest: the last `limit` of those after `after` (a viewer that starts late wants the present)
    assert [x["seq"] for x in s.samples_after(-1, limit=2, newest=True)] == [4, 5]
    assert [x["seq"] for x in s.samples_after(3, limit=4, newest=True)] == [4, 5]
    assert msgpack.unpackb(s.samples_after_msgpack(0, limit=1, newest=True), raw=False) == [s.latest()]
    s.close()


@pytest.mark.parametrize("n", [0, 1, 15, 16, 70000])
def test_array_header_before_packed_frames_is_a_msgpack_array(n: int) -> None:
    frames = [pack({"seq": i, "t": 0.5}) for i in range(n)]
    data = array_header(n) + b"".join(frames)
    assert msgpack.unpackb(data, raw=False) == [{"seq": i, "t": 0.5} for i in range(n)]


def test_ring_keeps_the_newest_capacity_frames() -> None:
    ring = Ring(3)
    for seq in range(1, 8):
        ring.append(seq, pack({"seq": seq, "t": float(seq)}), Summary(float(seq), 1.0, ()))
    assert len(ring) == 3 and ring.last_seq == 7
    assert [unpack(f)["seq"] for f in ring.frames_after(0, 10)] == [5, 6, 7]
    assert [unpack(f)["seq"] for f in ring.frames_after(5, 10)] == [6, 7]
    assert [s.t for s in ring.summaries_since(6.0)] == [6.0, 7.0]
    with pytest.raises(ValueError):
        ring.append(7, b"", Summary(8.0, None, ()))


def test_an_hour_at_one_hertz_fits_the_ring(tmp_path: Path) -> None:
    s = Sampler(TelemetryConfig(interval=1.0, ring_seconds=3600), tmp_path)
    assert s._ring.capacity == 3600
    s.close()


def test_telemetry_survives_an_agent_restart(tmp_path: Path) -> None:
    first = Sampler(TelemetryConfig(), tmp_path)
    before = [first.sample_once() for _ in range(3)]
    first.close()
    second = Sampler(TelemetryConfig(), tmp_path)
    assert second.samples_after(0) == before
    assert second.latest() == before[-1]
    assert second.sample_once()["seq"] == 4  # seq carries on across the restart
    second.close()
    third = Sampler(TelemetryConfig(), tmp_path)
    assert [x["seq"] for x in third.samples_after(0)] == [1, 2, 3, 4]
    third.close()


def test_a_crash_loses_at_most_the_unflushed_frames_and_a_torn_frame_is_dropped(tmp_path: Path) -> None:
    store = Store(tmp_path, segment_frames=100, flush_every=1)
    store.load(lambda sample, frame: None)
    frames = [pack({"seq": i, "t": float(i)}) for i in range(1, 4)]
    for frame in frames:
        store.append(frame)
    store.close()
    segment = tmp_path / segment_name(1)
    with segment.open("ab") as f:  # a crash in the middle of writing frame 4
        f.write(pack({"seq": 4, "t": 4.0})[:-3])
    again = Store(tmp_path, segment_frames=100)
    reloaded: list[bytes] = []
    again.load(lambda sample, frame: reloaded.append(frame))
    assert reloaded == frames
    assert segment.stat().st_size == sum(map(len, frames))  # the torn tail is cut off
    again.append(frames[0])
    again.close()


def test_store_rotates_and_stays_bounded_but_always_holds_a_full_ring(tmp_path: Path) -> None:
    capacity = 5
    s = Sampler(TelemetryConfig(interval=1.0, ring_seconds=capacity), tmp_path)
    for n in range(1, 24):
        s.sample_once()
        s.flush()
        segments = s.telemetry_files()
        assert len(segments) <= 2
        on_disk = sum(len(list(msgpack.Unpacker(p.open("rb"), raw=False))) for p in segments)
        assert min(n, capacity) <= on_disk <= 2 * capacity
    s.close()
    reloaded = Sampler(TelemetryConfig(interval=1.0, ring_seconds=capacity), tmp_path)
    assert [x["seq"] for x in reloaded.samples_after(0)] == [19, 20, 21, 22, 23]
    reloaded.close()


def test_garbage_in_a_segment_is_skipped(tmp_path: Path) -> None:
    directory = tmp_path / "telemetry"
    directory.mkdir()
    good = pack({"seq": 1, "t": 1.0})
    (directory / segment_name(1)).write_bytes(good + b"\xc1\xc1\xc1")  # 0xc1 is never valid msgpack
    s = Sampler(TelemetryConfig(), tmp_path)
    assert [x["seq"] for x in s.samples_after(0)] == [1]
    s.close()


async def test_the_loop_samples_at_its_interval_and_stop_flushes(tmp_path: Path) -> None:
    s = Sampler(TelemetryConfig(interval=0.05), tmp_path)
    await s.start()
    deadline = time.monotonic() + 20
    while (s.latest() or {}).get("seq", 0) < 4 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await s.stop()
    await s.stop()  # twice is fine
    seen = s.samples_after(0)
    assert [x["seq"] for x in seen] == list(range(1, len(seen) + 1)) and len(seen) >= 4
    assert all(b["t"] >= a["t"] for a, b in itertools.pairwise(seen))
    on_disk = [x for p in s.telemetry_files() for x in msgpack.Unpacker(p.open("rb"), raw=False)]
    assert on_disk == seen


def test_state_dir_layout(tmp_path: Path) -> None:
    s = Sampler(TelemetryConfig(), tmp_path)
    s.sample_once()
    s.flush()
    assert [p.relative_to(tmp_path) for p in s.telemetry_files()] == [Path("telemetry") / segment_name(1)]
    assert os.path.getsize(s.telemetry_files()[0]) > 0
    s.close()


def test_an_unusable_state_dir_keeps_telemetry_in_memory(tmp_path: Path) -> None:
    (tmp_path / "telemetry").write_text("a file where the directory should be")
    s = Sampler(TelemetryConfig(), tmp_path)
    s.sample_once()
    s.sample_once()
    assert [x["seq"] for x in s.samples_after(0)] == [1, 2] and s.telemetry_files() == []
    s.close()


def test_a_full_disk_is_logged_once_and_sampling_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The disk fills up: the store's file is swapped for /dev/full, which answers every write with ENOSPC."""
    s = Sampler(TelemetryConfig(), tmp_path)
    store = s._store
    assert store._file is not None
    store._file.close()
    store._file = open("/dev/full", "ab", buffering=0)  # noqa: SIM115
    with caplog.at_level("WARNING", logger="rawvm_agent.telemetry"):
        for _ in range(4):
            s.sample_once()
    assert [x["seq"] for x in s.samples_after(0)] == [1, 2, 3, 4]
    assert sum("No space left on device" in r.getMessage() for r in caplog.records) == 1
    s.close()
