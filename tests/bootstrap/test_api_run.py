"""``rawvm.run(...)`` from Python, on the local provider: output, result, and use from inside an event loop
(as in Jupyter)."""

from __future__ import annotations

import io
import json
import tempfile
import time
from pathlib import Path

import pytest
import rawvm

from tests.helpers.local import processes_under

pytestmark = [pytest.mark.network, pytest.mark.slow]


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    (root / "requirements.txt").write_text("humanize\n")
    (tmp_path / "tmp").mkdir()
    monkeypatch.chdir(root)
    monkeypatch.setenv("RAWVM_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # gettempdir() caches TMPDIR per process
    return root


async def test_run_from_python_inside_an_event_loop(project: Path, tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    result = rawvm.run(
        [
            "python",
            "-c",
            "import humanize, sys; print(humanize.intcomma(1234567)); print('oops', file=sys.stderr); sys.exit(5)",
        ],
        source="requirements.txt",
        keepalive="2s",
        output=out,
        error_output=err,
    )
    assert out.getvalue() == "1,234,567\n"
    assert err.getvalue() == "oops\n"
    assert result.exit_code == 5
    assert result.cost_usd == 0.0
    assert [m.provider for m in result.machines] == ["local"]
    assert {"lock", "stage", "launch", "ready", "task", "total"} <= set(result.timings)
    assert Path(result.machines[0].details["dir"]).is_relative_to(tmp_path / "tmp")
    deadline = time.monotonic() + 60
    while processes_under(tmp_path / "tmp") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_under(tmp_path / "tmp") == []
    from rawvm.files import records_dir

    assert json.loads((records_dir(result.cluster) / "provider.json").read_text())["provider"] == "local"
    # the machine has stopped: its output still comes back, from the logs it flushed to the local sink
    from rawvm import api, clusters

    for forgotten in (False, True):
        if forgotten:
            clusters.remove(result.cluster)  # as 'rawvm ls' does once every machine is gone
        logs = io.StringIO()
        assert api.logs(result.cluster, output=logs) == 0
        assert logs.getvalue() == "1,234,567\n"
