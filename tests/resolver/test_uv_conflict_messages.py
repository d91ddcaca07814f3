"""uv's "no solution" in a line one reads: at most ~300 characters, ``--python X`` where the conflict is about
Python versions, and uv's whole explanation under ``--explain``."""

from __future__ import annotations

from pathlib import Path

import pytest
from rawvm.cli import main
from rawvm_resolver.errors import ConflictError, ResolverError
from rawvm_resolver.uv_messages import SHORT_LIMIT, conflict, python_suggestion, summarise

from tests.systools import need_index

ABI_HINT = """error: No solution found when resolving dependencies
  cause: Because tensorflow==2.10.0 has no wheels with a matching Python ABI tag (e.g., `cp312`) and you require \
tensorflow==2.10.0, we can conclude that your requirements are unsatisfiable.

hint: You require CPython 3.12 (`cp312`), but we only found wheels for `tensorflow` (v2.10.0) with the following \
Python ABI tags: `cp37m`, `cp38`, `cp39`, `cp310`
"""

REQUIRES_PYTHON = """  \u00d7 No solution found when resolving dependencies:
  ╰─▶ Because the requested Python version (>=3.12) does not satisfy Python>=3.7,<3.11 and numba==0.56.4 depends \
on Python>=3.7,<3.11, we can conclude that numba==0.56.4 cannot be used.
      And because you require numba==0.56.4, we can conclude that your requirements are unsatisfiable.
"""

NEEDS_NEWER = """  \u00d7 No solution found when resolving dependencies:
  ╰─▶ Because the requested Python version (>=3.9) does not satisfy Python>=3.11 and foo==2.0 depends on \
Python>=3.11, we can conclude that foo==2.0 cannot be used.
"""


def long_chain(links: int = 30) -> str:
    """A proof of the kind uv gives for a tangle of pins: thousands of characters."""
    lines = ["  \u00d7 No solution found when resolving dependencies:"]
    for i in range(links):
        lines.append(
            f"  ╰─▶ Because pkg{i}==1.{i} depends on pkg{i + 1}>=2.{i},<3 and you require pkg{i + 1}==1.0, we can "
            f"conclude that pkg{i}==1.{i} cannot be used."
        )
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("stderr", "hint"),
    [
        (ABI_HINT, "--python 3.10"),
        (REQUIRES_PYTHON, "--python 3.10"),
        (NEEDS_NEWER, "--python 3.11"),
        (long_chain(), ""),
    ],
)
def test_python_suggestion(stderr: str, hint: str) -> None:
    assert python_suggestion(stderr) == hint


def test_a_long_conflict_is_a_short_line_and_the_whole_text_is_kept() -> None:
    stderr = long_chain()
    assert len(summarise(stderr)) > 3000
    error = conflict("cannot lock for linux-x86_64: the pins conflict", stderr)
    assert isinstance(error, ResolverError)
    line = str(error)
    assert "\n" not in line
    assert len(line) <= SHORT_LIMIT
    assert line.startswith("cannot lock for linux-x86_64: the pins conflict: Because pkg0==1.0 depends on pkg1")
    assert line.endswith("… (about pkg0, pkg1, pkg2, pkg3; whole text: rawvm lock --explain)")  # a cut line names them
    assert "pkg29==1.29 cannot be used" in error.detail


def test_a_python_conflict_suggests_the_python_that_fits() -> None:
    line = str(conflict("cannot lock for linux-x86_64", REQUIRES_PYTHON))
    assert line.startswith("cannot lock for linux-x86_64: Because the requested Python version (>=3.12)")
    assert "; try --python 3.10" in line
    assert len(line) <= SHORT_LIMIT + len("; try --python 3.10")


def test_a_short_conflict_is_whole_on_its_line() -> None:
    line = str(conflict("cannot lock for linux-x86_64", NEEDS_NEWER))
    assert "explain" not in line
    assert line.endswith("we can conclude that foo==2.0 cannot be used.; try --python 3.11")


def test_lock_prints_a_real_conflict_short_and_whole_under_explain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    need_index()
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("pandas==2.2.0\nnumpy==1.21.0\n")
    argv = ["lock", "--from", str(requirements), "--python", "3.12", "--strict", "-o", str(tmp_path / "b")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("rawvm: cannot lock for linux-x86_64: Because pandas==2.2.0 depends on numpy")
    assert len(err[-1]) <= len("rawvm: ") + SHORT_LIMIT
    assert main([*argv, "--explain"]) == 1
    explained = capsys.readouterr().err
    assert "No solution found when resolving dependencies" in explained  # uv's own text, as uv wrote it
    assert explained.strip().splitlines()[-1] == err[-1]


def test_conflict_error_is_one_line_to_the_cli() -> None:
    assert ConflictError("a line", "the\nwhole\ntext").detail.count("\n") == 2
