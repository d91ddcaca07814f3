"""``--compile-bytecode`` (issue 22: "bytecode compilation off unless asked"): the flag reaches the agent's
``[install]``, and a real ``rawvm.run`` on the local provider installs the environment with its ``.pyc`` files."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import rawvm
from rawvm.cli import build_parser
from rawvm.cli.flags import launch_options as from_flags

from tests.helpers.local import isolate_state


@pytest.mark.parametrize("argv, asked", [([], False), (["--compile-bytecode"], True)])
def test_the_flag_asks_for_bytecode_and_it_is_off_by_default(argv: list[str], asked: bool) -> None:
    for command in (["run"], ["up"], ["batch", "run", "--array", "0-1"], ["dask", "up"]):
        args = build_parser().parse_args([*command, *argv])
        assert from_flags(args).environment.compile_bytecode is asked


@pytest.mark.network
@pytest.mark.slow
def test_an_environment_installed_with_bytecode_has_its_pyc_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    isolate_state(tmp_path, monkeypatch)
    project = tmp_path / "project"
    project.mkdir()
    (project / "requirements.in").write_text("six==1.16.0\n")
    monkeypatch.chdir(project)
    # -B: the task's own import writes no .pyc, so one there came from the install
    probe = "import importlib.util, os, six; print(os.path.exists(importlib.util.cache_from_source(six.__file__)))"
    out = io.StringIO()
    result = rawvm.run(
        ["python", "-B", "-c", probe],
        source="requirements.in",
        compile_bytecode=True,
        keepalive="2s",
        output=out,
        error_output=io.StringIO(),
    )
    assert result.exit_code == 0
    assert out.getvalue() == "True\n"
