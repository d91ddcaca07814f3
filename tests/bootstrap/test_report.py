"""``rawvm report``: from the telemetry flushed to the sink, after the machines are gone.

- A real local cluster runs a task and stops by itself; the report's HTML is rendered by a real headless
  Chromium (screenshot non-blank, summary numbers in the rendered page), its parquet rows are the samples the
  machines flushed, and its machine-hours are computed here by hand from those samples.
- 8 GPUs from the fake ``pynvml.nvmlLib`` (the agent's real GpuCollector reads it), GPU 7 idle, planted as one
  hour of 1 Hz samples with a 10-minute outage in the middle, written by the agent's own telemetry Store into the
  sink layout: the summary's idle GPU-hours, their cost, GPU-hours and utilization match the figures worked out
  by hand below.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import polars as pl
import psutil
import pytest
from aiohttp import ClientSession
from PIL import Image
from rawvm import clusters, sinks
from rawvm.cli import main
from rawvm.cli.report import make_report
from rawvm.observe import report_data, report_render, report_summary
from rawvm.providers.base import Machine
from rawvm_agent.telemetry.collectors import CpuCollector, GpuCollector, MemoryCollector
from rawvm_agent.telemetry.sample import pack
from rawvm_agent.telemetry.store import Store

from tests.agent.core_helpers import TOKEN
from tests.agent.test_metrics_prometheus import ServerFactory, serve_agent
from tests.agent.test_nvml_fakelib import eight_gpm_gpus, eight_gpus, installed
from tests.helpers.local import local_project
from tests.helpers.tls import make_test_channel
from tests.systools import need_tool

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


def rawvm(*args: str, env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rawvm.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def flushed_samples(sink: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """Every sample frame in the sink, read here with msgpack alone: (machine, seq) -> sample."""
    found = {}
    for segment in sink.glob("*/telemetry/samples-*.msgpack"):
        machine = segment.parent.parent.name.split("-")[2]  # rawvm-xxxxxx-m0-<UTC time>
        with segment.open("rb") as f:
            for sample in msgpack.Unpacker(f, raw=False, strict_map_key=False):
                found[(machine, sample["seq"])] = sample
    return found


def chromium(html: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    exe = need_tool("chromium", "chromium")
    return subprocess.run(
        [exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'chromium-profile'}", *args, html.as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.slow
def test_report_of_a_local_cluster_whose_machines_are_gone(tmp_path: Path) -> None:
    burn = "import time\nend = time.time() + 3\nwhile time.time() < end:\n    pass\n"
    project, tmp, env = local_project(tmp_path, {"requirements.txt": "", "burn.py": burn})
    state = tmp_path / "state"
    up = rawvm("up", "-n", "2", "--keepalive", "4s", "--from", "requirements.txt", env=env, cwd=project)
    assert up.returncode == 0, up.stderr
    cluster = up.stdout.strip()
    run = rawvm("run", "--cluster", cluster, "--", "python", "burn.py", env=env, cwd=project)
    assert run.returncode == 0, run.stderr
    sink = state / "sinks" / cluster
    deadline = time.monotonic() + 120
    while (
        len(list(sink.glob(f"{cluster}-m*/telemetry"))) < 2 or (tmp / f"rawvm-local-{os.getuid()}" / cluster).exists()
    ):
        assert time.monotonic() < deadline, "the machines did not stop by themselves and flush"
        time.sleep(0.5)

    html, parquet, png = tmp_path / "r.html", tmp_path / "r.parquet", tmp_path / "r.png"
    for out in (html, parquet, png):
        made = rawvm("report", cluster, "-o", str(out), env=env, cwd=project)
        assert made.returncode == 0, made.stderr
        assert f"rawvm: {out}" in made.stderr and "2 machines" in made.stderr

    # parquet: one row per flushed sample, same values
    samples = flushed_samples(sink)
    table = pl.read_parquet(parquet)
    assert table.height == len(samples) > 4
    for row in table.iter_rows(named=True):
        sample = samples[(row["machine"], row["seq"])]
        assert row["t"] == sample["t"] and row["cpu_percent"] == sample["cpu"]["percent"]
        assert row["memory_used_bytes"] == sample["memory"]["used_bytes"]
    # machine-hours by hand: each machine's span plus one typical interval (regular samples, no outage)
    by_hand = 0.0
    for machine in ("m0", "m1"):
        times = sorted(s["t"] for (m, _), s in samples.items() if m == machine)
        by_hand += (times[-1] - times[0] + statistics.median(b - a for a, b in itertools.pairwise(times))) / 3600

    shot = tmp_path / "shot.png"
    result = chromium(html, tmp_path, f"--screenshot={shot}", "--window-size=1200,1600")
    assert shot.is_file(), result.stderr[-2000:]
    with Image.open(shot) as image:
        pixels = image.convert("L").resize((300, 400)).tobytes()
        dark = sum(1 for p in pixels if p < 200)
        assert dark > 0.02 * len(pixels), "the rendered page is blank"
        colours = image.convert("RGB").getcolors(maxcolors=1 << 24) or []
        assert len(colours) > 20  # text and coloured plot lines, not one colour
    dom = chromium(html, tmp_path, "--dump-dom").stdout
    assert f'<td id="machine-hours">{by_hand:.3f}</td>' in dom
    assert '<td id="machines">2</td>' in dom and '<td id="gpu-hours">0.000</td>' in dom
    assert dom.count("<code>python burn.py</code>") == 2  # the task on each machine, with its marks
    assert dom.count("<svg") >= 2 and "<script" not in dom  # plots inline, nothing to fetch
    with Image.open(png) as image:
        assert image.width > 500 and image.height > 800


# -- GPU figures against a hand count ------------------------------------------------------------------------

PRICE = 98.32  # $/h of the 8-GPU machine in the record
T0 = 1_790_000_000.0


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RAWVM_STATE_DIR", str(tmp_path / "state"))
    # The planted records name aws: with no region its sink cannot be fetched (said in one line), and nothing
    # here reaches out to AWS.
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    return tmp_path / "state"


def plant_gpu_cluster(name: str, price: float, flushed_as: str = "m0", machine_id: str = "m0") -> list[dict[str, Any]]:
    """One hour of 1 Hz samples of an 8-GPU machine (GPU 7 idle), with 10 minutes missing in the middle."""
    lib = eight_gpus()
    lib.gpus[7].util_gpu = 0
    with installed(lib):
        gpu = GpuCollector()
        gpus = gpu.collect()
        gpu.close()
    cpu, memory = CpuCollector().collect(), MemoryCollector().collect()
    times = [T0 + k for k in range(1800)] + [T0 + 2400 + k for k in range(1800)]
    flush = sinks.sink_dir(name) / f"{name}-{flushed_as}-20260101T000000Z"
    store = Store(flush / "telemetry", segment_frames=len(times))
    store.load(lambda sample, frame: None)
    planted = []
    for seq, t in enumerate(times, start=1):
        sample = {"seq": seq, "t": t, "cpu": cpu, "memory": memory, "gpu": gpus}
        store.append(pack(sample))
        planted.append(sample)
    store.close()
    task = {"id": "t1", "argv": ["python", "train.py"], "started_at": T0 + 10, "ended_at": T0 + 4000, "exit_code": 0}
    (flush / "tasks" / "t1").mkdir(parents=True)
    (flush / "tasks" / "t1" / "task.json").write_text(json.dumps(task))
    machine = Machine(id=f"{name}-{machine_id}", provider="aws", cluster=name, agent_url="", price_per_hour=price)
    clusters.save(clusters.ClusterRecord(name=name, provider="aws", token="x", machines=[machine]))
    return planted


@pytest.mark.slow  # matplotlib draws 8 GPUs x 3600 samples
def test_idle_gpu_hours_and_their_cost_match_the_hand_count(state: Path, tmp_path: Path) -> None:
    planted = plant_gpu_cluster("gpus", PRICE)
    # By hand: 3600 samples, each standing for 1 s (the 600 s outage counts as nothing), so every GPU was seen
    # for exactly 1 h. GPU 7 read 0 % all along (idle: below 5 %); GPU 0 read 5 %, which is busy, as for the agent.
    utils = [g["utilization_gpu_percent"] for g in planted[0]["gpu"]]
    assert utils == [5, 15, 25, 35, 45, 55, 65, 0]
    idle_gpu_hours = 1.0
    idle_cost = idle_gpu_hours * PRICE / 8
    mean_util = sum(utils) / 8
    p95 = statistics.quantiles([u for u in utils for _ in planted], n=20, method="inclusive")[18]

    html = tmp_path / "gpus.html"
    summary = make_report("gpus", html, "html", live=False)
    assert summary.machine_hours == pytest.approx(1.0)
    assert summary.gpu_hours == pytest.approx(8.0)
    assert summary.idle_gpu_hours == pytest.approx(idle_gpu_hours)
    assert summary.idle_gpu_cost_usd == pytest.approx(idle_cost)  # 12.29
    assert summary.cost_usd == pytest.approx(PRICE)
    assert summary.mean_gpu_util_percent == pytest.approx(mean_util)
    assert summary.p95_gpu_util_percent == pytest.approx(p95)
    page = html.read_text()
    assert '<td id="idle-gpu-hours">1.000</td>' in page and f'<td id="idle-gpu-cost">${idle_cost:,.2f}</td>' in page
    assert '<td id="gpu-hours">8.000</td>' in page and f'<td id="p95-gpu-util">{p95:.1f}%</td>' in page
    assert "<code>python train.py</code>" in page

    parquet = tmp_path / "gpus.parquet"
    make_report("gpus", parquet, "parquet", live=False)
    table = pl.read_parquet(parquet)
    assert table.height == 3600 and table.get_column("seq").to_list() == list(range(1, 3601))
    assert table.get_column("gpu7_util_percent").unique().to_list() == [0.0]
    assert table.get_column("gpu3_power_watts").null_count() == 3600  # GPU 3 answers NotSupported for power
    assert table.get_column("gpu4_power_watts").unique().to_list() == [106.0]


@pytest.mark.slow
def test_an_ec2_flush_named_after_its_host_costs_the_clusters_one_price(state: Path, tmp_path: Path) -> None:
    # EC2 machines share one agent.toml, so they flush under their host name, which the record does not know
    plant_gpu_cluster("ec2", PRICE, flushed_as="ip-10-0-0-5", machine_id="i-0abc")
    summary = make_report("ec2", tmp_path / "r.csv", "csv", live=False)
    assert [m.machine for m in summary.machines] == ["ip-10-0-0-5"]
    assert summary.idle_gpu_cost_usd == pytest.approx(PRICE / 8)
    assert pl.read_csv(tmp_path / "r.csv").height == 3600


@pytest.mark.slow
def test_an_unknown_price_is_unknown_not_zero(state: Path, tmp_path: Path) -> None:
    plant_gpu_cluster("noprice", 0.0)  # an aws machine whose price the record does not know
    summary = make_report("noprice", tmp_path / "r.html", "html", live=False)
    assert summary.idle_gpu_hours == pytest.approx(1.0)
    assert summary.idle_gpu_cost_usd is None and summary.cost_usd is None
    assert '<td id="idle-gpu-cost">unknown</td>' in (tmp_path / "r.html").read_text()


def test_missing_extra_and_bad_input_are_one_line(
    state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", "nothing-here", "-o", str(tmp_path / "r.html")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rawvm: no telemetry for cluster nothing-here") and err.count("\n") == 1
    assert main(["report", "gpus", "-o", str(tmp_path / "r.txt")]) != 0
    assert "--format html|png|parquet|csv" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "polars", None)  # as if rawvm[report] were not installed
    assert main(["report", "gpus", "-o", str(tmp_path / "r.html")]) != 0
    err = capsys.readouterr().err
    assert err == "rawvm: rawvm report needs its plotting and dataframe libraries: pip install 'rawvm[report]'\n"


@pytest.fixture(autouse=True)
def _no_stray_records(state: Path) -> Iterator[None]:
    yield
    for record in clusters.all_records():
        clusters.remove(record.name)


async def test_a_running_machine_reports_from_its_agent(
    state: Path, tmp_path: Path, aiohttp_server: ServerFactory
) -> None:
    """Nothing flushed yet: the samples and tasks come from the running agent (8 fake GPUs), paged by seq."""
    with installed(eight_gpus()):
        channel = make_test_channel(tmp_path / "tls", "live")
        server = await serve_agent(aiohttp_server, tmp_path / "agent", channel.agent)
        await asyncio.sleep(1.0)  # a few samples at the test agent's 0.2 s interval
        url = str(server.make_url("")).rstrip("/")
        machine = Machine(id="live-m0", provider="local", cluster="live", agent_url=url, launched_at=time.time())
        laptop = str(channel.laptop.directory)
        record = clusters.ClusterRecord(
            name="live", provider="local", token=TOKEN, machines=[machine], channel_dir=laptop
        )
        clusters.save(record)
        parquet = tmp_path / "live.parquet"
        summary = await asyncio.to_thread(make_report, "live", parquet, "parquet")
        async with ClientSession() as http:
            headers = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/json"}
            async with http.get(f"{url}/v1/samples", headers=headers, ssl=channel.context()) as resp:
                served = {s["seq"]: s for s in await resp.json()}
    table = pl.read_parquet(parquet)
    assert table.height >= 3 and set(table.get_column("seq").to_list()) <= set(served)
    assert [m.machine for m in summary.machines] == ["m0"] and summary.machines[0].gpus == 8
    assert summary.gpu_hours > 0 and summary.cost_usd == 0.0  # local: free
    for row in table.iter_rows(named=True):
        assert row["gpu2_util_percent"] == served[row["seq"]]["gpu"][2]["utilization_gpu_percent"] == 25
    assert not [c for c in table.columns if "tensor" in c]  # no GPM on these GPUs: no profiling columns


async def test_gpm_profiling_fields_reach_the_report_csv(
    state: Path, tmp_path: Path, aiohttp_server: ServerFactory
) -> None:
    """A running Hopper-class machine (8 fake GPUs with GPM): the CSV has each GPU's tensor, SM and DRAM activity
    and PCIe/NVLink rates as the agent sampled them; GPU 2, without NVLink, has those columns empty."""
    with installed(eight_gpm_gpus()):
        channel = make_test_channel(tmp_path / "tls", "hopper")
        server = await serve_agent(aiohttp_server, tmp_path / "agent", channel.agent)
        await asyncio.sleep(1.0)  # a few samples at the test agent's 0.2 s interval (GPM needs two)
        url = str(server.make_url("")).rstrip("/")
        machine = Machine(id="hopper-m0", provider="local", cluster="hopper", agent_url=url, launched_at=time.time())
        record = clusters.ClusterRecord(
            name="hopper", provider="local", token=TOKEN, machines=[machine], channel_dir=str(channel.laptop.directory)
        )
        clusters.save(record)
        csv = tmp_path / "hopper.csv"
        await asyncio.to_thread(make_report, "hopper", csv, "csv")
    table = pl.read_csv(csv)
    measured = table.filter(pl.col("gpu0_tensor_active_percent").is_not_null())
    assert measured.height >= 2 and measured.height >= table.height - 1  # only the agent's first sample lacks it
    for i in range(8):
        assert measured.get_column(f"gpu{i}_tensor_active_percent").unique().to_list() == [30.0 + 2 * i]
        assert measured.get_column(f"gpu{i}_sm_active_percent").unique().to_list() == [40.0 + i]
        assert measured.get_column(f"gpu{i}_pcie_transmit_bytes_per_second").unique().to_list() == [(100 + i) << 20]
    assert measured.get_column("gpu2_nvlink_transmit_bytes_per_second").null_count() == measured.height
    assert measured.get_column("gpu3_nvlink_transmit_bytes_per_second").unique().to_list() == [2003 << 20]


@pytest.mark.slow
def test_rawvm_down_lets_the_machines_flush_first(tmp_path: Path) -> None:
    """``rawvm down`` asks each agent to stop and waits for its flush before ending the machine, so the report
    (and ``rawvm logs``) still has the machine's telemetry and tasks afterwards."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "requirements.txt").write_text("")
    state = tmp_path / "state"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "RAWVM_STATE_DIR": str(state), "TMPDIR": str(tmp)}
    up = rawvm("up", "--keepalive", "10m", "--from", "requirements.txt", env=env, cwd=project)
    assert up.returncode == 0, up.stderr
    cluster = up.stdout.strip()
    run = rawvm("run", "--cluster", cluster, "--", "python", "-c", "print('hi')", env=env, cwd=project)
    assert run.returncode == 0 and run.stdout == "hi\n", run.stderr
    down = rawvm("down", cluster, env=env, cwd=project)
    assert down.returncode == 0, down.stderr
    (flush,) = (state / "sinks" / cluster).glob(f"{cluster}-m0-*")
    assert list(flush.glob("telemetry/samples-*.msgpack")) and list(flush.glob("tasks/*/task.json"))
    out = tmp_path / "r.html"
    made = rawvm("report", cluster, "-o", str(out), env=env, cwd=project)
    assert made.returncode == 0, made.stderr
    assert "<code>python -c print(&#x27;hi&#x27;)</code>" in out.read_text()


# -- the PNG: one time axis, a legend, labels that do not overprint ------------------------------------------


def plant_batch_machine(
    cluster: str, machine: str, start: float, ids: range, seconds: float, *, layout: str = "segments"
) -> None:
    """A local machine's flush: 1 Hz samples (CPU rising and falling) and one short batch task per id, each with
    its result (id, value, the agent task that ran it), as an agent writes them: ``segments`` (lines of
    ``batch/results/*.jsonl``, and no task record for an attempt that printed nothing, as here) or ``files`` (a
    ``task.json`` per attempt and a ``<id>.json`` per result, as agents before segments wrote)."""
    flush = sinks.sink_dir(cluster) / f"{cluster}-{machine}-20260101T000000Z"
    end = start + len(ids) * seconds + 5
    times = [start + k for k in range(int(end - start))]
    store = Store(flush / "telemetry", segment_frames=len(times))
    store.load(lambda sample, frame: None)
    memory = MemoryCollector().collect()
    for seq, t in enumerate(times, start=1):
        cpu = {"percent": float((seq * 7) % 100), "cores": 2}
        store.append(pack({"seq": seq, "t": t, "cpu": cpu, "memory": {**memory, "used_bytes": seq << 20}}))
    store.close()
    for k, bid in enumerate(ids):
        task_id = f"b{bid}"
        began = start + 2 + k * seconds
        task = {"id": task_id, "argv": ["python", "sweep.py"], "started_at": began, "ended_at": began + seconds * 0.8}
        attempt = {"task": task_id, "exit_code": 0, "started_at": began, "ended_at": task["ended_at"]}
        result = {"id": bid, "value": f"lr={bid / 1000:g}", "state": "done", "attempts": [attempt], "machine": machine}
        (flush / "batch" / "results").mkdir(parents=True, exist_ok=True)
        if layout == "files":
            (flush / "tasks" / task_id).mkdir(parents=True)
            (flush / "tasks" / task_id / "task.json").write_text(json.dumps({**task, "exit_code": 0}))
            (flush / "batch" / "results" / f"{bid}.json").write_text(json.dumps(result))
        else:
            with (flush / "batch" / "results" / f"{k // 10:06d}.jsonl").open("a") as segment:
                segment.write(json.dumps({**result, "attempts": [{**attempt, "output_bytes": 0}]}) + "\n")
    if layout != "files":
        (flush / "batch" / "spec.json").write_text(json.dumps({"format": 1, "argv": ["python", "sweep.py"]}))


def test_the_png_has_one_time_axis_a_legend_and_labels_that_never_overprint(state: Path, tmp_path: Path) -> None:
    """Three machines that ran at different times (a batch and its retry's machine), with many short tasks: every
    panel shares one x axis over the whole period, the figure has a legend for the task marks, tasks are named
    by batch id and value, and no two printed labels overlap (the rest are left out and counted)."""
    sinks.remember_sink_provider("sweep", "local", {})
    plant_batch_machine("sweep", "m0", T0, range(0, 40), 3.0)  # 40 tasks of 3 s: far too dense to label all
    plant_batch_machine("sweep", "m1", T0, range(40, 44), 30.0)
    plant_batch_machine("sweep", "m2", T0 + 200, range(44, 46), 20.0, layout="files")  # a retry's machine, later
    telemetry = report_data.collect("sweep", live=False)
    frames = report_data.frames(telemetry)
    summary = report_summary.summarize(telemetry, frames)
    tasks = telemetry.task_marks()
    # every attempt is marked, with its command: from its task.json (m2) or from its result and the spec (m0, m1)
    assert len(tasks) == 46 and all(t.argv == ["python", "sweep.py"] and t.exit_code == 0 for t in tasks)
    assert [m.machine for m in summary.machines] == ["m0", "m1", "m2"]
    assert {t.label for t in tasks if t.machine == "m2"} == {"#44 lr=0.044", "#45 lr=0.045"}

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = report_render.png_figure(summary, frames, tasks, max_machines=24)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # lay it out: positions and text extents are final
    axes = [ax for ax in fig.axes]
    assert len(axes) == 9  # three panels per machine
    shared = axes[0].get_shared_x_axes()
    assert all(shared.joined(axes[0], ax) for ax in axes)
    assert len({ax.get_xlim() for ax in axes}) == 1  # and the same limits: the whole period
    legends = [legend for sub in fig.subfigs for legend in sub.legends]
    assert legends and "task start" in " ".join(t.get_text() for t in legends[0].get_texts())

    renderer = canvas.get_renderer()
    labels = [t for ax in axes for t in ax.texts if t.get_text().startswith("#")]
    assert labels and all(t.get_text().startswith("#") for t in labels)
    boxes = [t.get_window_extent(renderer) for t in labels]
    for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2):
        assert not a.overlaps(b), f"{labels[i].get_text()!r} overprints {labels[j].get_text()!r}"
    m0_labels = [t for t in axes[0].texts if t.get_text().startswith("#")]
    assert 3 <= len(m0_labels) < 40  # thinned, not dropped altogether
    assert "task labels left out" in axes[0].get_title(loc="right")
    out = Path(os.environ.get("RAWVM_REPORT_EXAMPLE", tmp_path / "example.png"))
    report_render.write_png(out, summary, frames, tasks, 24)
    with Image.open(out) as image:
        assert image.width > 500


# -- after a batch and its retry: every machine, its own name, its own process tree ---------------------------

FLAKY = (
    "import os, pathlib, sys, time\n"
    "i = int(os.environ['RAWVM_TASK_ID'])\n"
    "marker = pathlib.Path(sys.argv[1]) / f'ran-{i}'\n"
    "block = bytearray((40 + 40 * i) << 20)  # each task holds its own amount of memory for a while\n"
    "end = time.time() + 1.5\n"
    "while time.time() < end:\n"
    "    pass\n"
    "first = i == 3 and not marker.exists()\n"
    "marker.write_text('ran')\n"
    "sys.exit(3 if first else 0)\n"
)


def wait_flushed(state: Path, tmp: Path, cluster: str, machines: int, timeout: float = 120) -> None:
    """Until ``machines`` machines have flushed their telemetry and none of the cluster's runs."""
    sink = state / "sinks" / cluster
    deadline = time.monotonic() + timeout
    while (
        len(list(sink.glob(f"{cluster}-m*/telemetry"))) < machines
        or (tmp / f"rawvm-local-{os.getuid()}" / cluster).exists()
    ):
        assert time.monotonic() < deadline, sorted(p.name for p in sink.glob("*"))
        time.sleep(0.5)


@pytest.mark.slow
def test_a_report_after_batch_retry_counts_every_machine_with_its_own_samples(tmp_path: Path) -> None:
    """``batch run`` on two local machines (task 3 fails, no retries), then ``batch retry``: the retry's machine is
    ``m2``, not ``m0`` again, and the csv report has the samples of all three, each machine's own (its
    process tree's memory, not the host's), with machine-hours their sum."""
    project, tmp, env = local_project(tmp_path, {"requirements.txt": "", "flaky.py": FLAKY})
    state = tmp_path / "state"
    (tmp_path / "markers").mkdir()
    run = rawvm(
        *("batch", "run", "--array", "0-5", "-n", "2", "--max-retries", "0", "--keepalive", "3s"),
        *("--from", "requirements.txt", "--", "python", "flaky.py", str(tmp_path / "markers")),
        env=env,
        cwd=project,
    )
    assert run.returncode == 1, run.stderr  # task 3 failed
    cluster = run.stdout.strip()
    wait_flushed(state, tmp, cluster, 2)
    retry = rawvm("batch", "retry", cluster, env=env, cwd=project)
    assert retry.returncode == 0, retry.stderr
    wait_flushed(state, tmp, cluster, 3)
    flushed = sorted({p.name.split("-")[2] for p in (state / "sinks" / cluster).glob(f"{cluster}-m*")})
    assert flushed == ["m0", "m1", "m2"]

    csv = tmp_path / "r.csv"
    made = rawvm("report", cluster, "-o", str(csv), "--format", "csv", env=env, cwd=project)
    assert made.returncode == 0, made.stderr
    assert "3 machines" in made.stderr
    table = pl.read_csv(csv)
    samples = flushed_samples(state / "sinks" / cluster)
    assert sorted(table.get_column("machine").unique().to_list()) == ["m0", "m1", "m2"]
    assert table.height == len(samples)  # every machine's every sample: none merged into another's
    for row in table.iter_rows(named=True):
        assert row["memory_used_bytes"] == samples[(row["machine"], row["seq"])]["memory"]["used_bytes"]
    # each machine's own process tree: far below the host's use, and different from machine to machine
    peaks = table.group_by("machine").agg(pl.col("memory_used_bytes").max()).sort("machine")
    assert all(peak < psutil.virtual_memory().total / 4 for peak in peaks.get_column("memory_used_bytes"))
    assert all(s["cpu"].get("scope") == "process-tree" for s in samples.values())
    assert peaks.get_column("memory_used_bytes").n_unique() == 3
    summary = make_report(cluster, tmp_path / "r.png", "png", live=False)
    assert len(summary.machines) == 3
    assert summary.machine_hours == pytest.approx(sum(m.hours for m in summary.machines))
    assert all(m.hours > 0 for m in summary.machines)


def test_a_machine_that_ran_and_left_no_telemetry_is_still_counted(state: Path, tmp_path: Path) -> None:
    """A batch's first round had m0 and m1 (m1 killed before it flushed anything), its retry m2: three machines
    ran, two left telemetry; the report says so rather than "2 machines"."""
    from rawvm.files import records_dir, write_private_json
    from rawvm.observe.report_render import summary_rows

    sinks.remember_sink_provider("killed", "local", {})
    plant_batch_machine("killed", "m0", T0, range(0, 3), 5.0)
    plant_batch_machine("killed", "m2", T0 + 100, range(3, 4), 5.0)
    write_private_json(
        records_dir("killed") / "batch.json", {"rounds": [{"machines": ["m0", "m1"]}, {"machines": ["m2"]}]}
    )
    summary = make_report("killed", tmp_path / "r.csv", "csv", live=False)
    assert [m.machine for m in summary.machines] == ["m0", "m2"] and summary.silent == ["m1"]
    assert summary.machine_count == 3
    assert ("machines", "machines", "3 (m1: no telemetry)") in summary_rows(summary)
