"""Shared fixtures. Markers (network, vm, slow) are declared in the root pyproject.toml; CI runs them all."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO
