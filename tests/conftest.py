"""Fixtures shared by unit and end-to-end tests."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import CAProcess, run_meshca, start_ca  # noqa: E402


@pytest.fixture
def ca_home(tmp_path: Path) -> Path:
    """A CA initialised with the real `meshca init`."""
    home = tmp_path / "ca"
    run_meshca("init", "--home", str(home))
    return home


@pytest.fixture
def ca(ca_home: Path) -> Iterator[CAProcess]:
    """A running `meshca serve` on a free loopback port, stopped after the test."""
    proc = start_ca(ca_home)
    try:
        yield proc
    finally:
        proc.stop()
