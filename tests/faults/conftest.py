"""Fixtures of the fault-injection tests (helpers: faults/helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def marker(tmp_path) -> Path:
    """Where a planted pickle's payload would leave its trace; asserted absent afterwards."""
    return tmp_path / "PAYLOAD-RAN"


@pytest.fixture(autouse=True)
def _away_from_the_repository_params(tmp_path, monkeypatch):
    """Run where no ./params.yaml is picked up: built-in defaults plus each test's --set."""
    monkeypatch.chdir(tmp_path)
