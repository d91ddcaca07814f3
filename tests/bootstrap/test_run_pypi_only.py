"""``rawvm.run(..., pypi_only=True)`` on the local provider: a macOS ``conda list --export`` file is locked from
PyPI alone and installed for real on the machine, which imports what the conda environment had."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import pytest
import rawvm

pytestmark = [pytest.mark.network, pytest.mark.slow]

EXPORT = """# This file may be used to create an environment using:
# $ conda create --name <env> --file <this file>
# platform: osx-arm64
bzip2=1.0.8=h93a5062_5
libcxx=16.0.6=h4653b0c_0
python={python}=h4a7b5fc_0_cpython
six=1.16.0=pyh6c4a22f_0
humanize=4.9.0=pypi_0
openssl=3.3.0=hfb2fe0b_2
"""


def test_conda_export_runs_from_pypi_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import platform

    project = tmp_path / "project"
    project.mkdir()
    (project / "conda-list.txt").write_text(EXPORT.format(python=platform.python_version()))
    (tmp_path / "tmp").mkdir()
    monkeypatch.chdir(project)
    monkeypatch.setenv("RAWVM_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # gettempdir() caches TMPDIR per process
    out = io.StringIO()
    result = rawvm.run(
        ["python", "-c", "import six, humanize; print(six.__version__, humanize.intcomma(1234))"],
        source="conda-list.txt",
        pypi_only=True,
        keepalive="2s",
        output=out,
        error_output=io.StringIO(),
    )
    assert result.exit_code == 0
    assert out.getvalue() == "1.16.0 1,234\n"
