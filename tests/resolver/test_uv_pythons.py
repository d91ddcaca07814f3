"""A target Python uv has no interpreter of (and cannot download one of) costs its download try once per process,
not once per uv run (rawvm_resolver/uv_pythons.py). Real uv: ``uv python find`` on this machine."""

from __future__ import annotations

import sys

import pytest
from rawvm_resolver.compile import uv_bin
from rawvm_resolver.uv_pythons import UvPythons

RUNNING = f"{sys.version_info.major}.{sys.version_info.minor}"
NO_SUCH = "3.99"  # no interpreter anywhere, and no managed download of it either


def test_a_failed_run_still_settles_the_question() -> None:
    pythons = UvPythons()
    with pytest.raises(TimeoutError), pythons.run_for(NO_SUCH, uv_bin):
        raise TimeoutError  # uv ran past its time
    assert pythons.env(NO_SUCH)["UV_PYTHON_DOWNLOADS"] == "never"


@pytest.fixture(autouse=True)
def _no_user_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UV_PYTHON_DOWNLOADS", raising=False)


def test_a_python_uv_could_not_get_is_not_downloaded_again() -> None:
    pythons = UvPythons()
    assert "UV_PYTHON_DOWNLOADS" not in pythons.env(NO_SUCH)  # the first run may download it
    with pythons.run_for(NO_SUCH, uv_bin):
        assert "UV_PYTHON_DOWNLOADS" not in pythons.env(NO_SUCH)  # the question runs beside the first run
    assert pythons.env(NO_SUCH)["UV_PYTHON_DOWNLOADS"] == "never"
    assert pythons.env(NO_SUCH)["UV_NO_PROGRESS"] == "1"


def test_a_python_uv_has_changes_nothing() -> None:
    pythons = UvPythons()
    with pythons.run_for(RUNNING, uv_bin):
        pass
    assert "UV_PYTHON_DOWNLOADS" not in pythons.env(RUNNING)


def test_uv_is_asked_once_per_python() -> None:
    asked: list[str] = []

    def counting_uv() -> str:
        asked.append("uv")
        return uv_bin()

    pythons = UvPythons()
    for _ in range(3):
        with pythons.run_for(NO_SUCH, counting_uv):
            pass
    assert asked == ["uv"]


def test_the_users_own_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UV_PYTHON_DOWNLOADS", "automatic")
    pythons = UvPythons()
    with pythons.run_for(NO_SUCH, uv_bin):
        pass
    assert pythons.env(NO_SUCH)["UV_PYTHON_DOWNLOADS"] == "automatic"


def test_a_missing_uv_leaves_uv_to_decide() -> None:
    pythons = UvPythons()
    with pythons.run_for(NO_SUCH, lambda: "/nonexistent/uv"):
        pass
    assert "UV_PYTHON_DOWNLOADS" not in pythons.env(NO_SUCH)
