"""Fixtures shared by the tests: an isolated cache, the planted run and its folder, a CLI runner.
Helper functions are in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import Planted, plant, write_run


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Default trajectory stores go under the test's tmp folder, never the user's home."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CMDTOOL_CACHE", str(cache))
    return cache


@pytest.fixture
def planted() -> Planted:
    return plant()


@pytest.fixture
def run_dir(tmp_path, planted) -> Path:
    """A folder of 20 safetensors checkpoints of the planted run."""
    return write_run(tmp_path / "run", planted.states())


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()
