"""Shared fixtures. Real recordings are read from ../shared/data (or $MTSCALE_DATA); tests that
need them skip with a reason where absent, unless MTSCALE_REQUIRE_DATA=1 (CI), where a missing
data folder is a failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _data_root() -> Path:
    env = os.environ.get("MTSCALE_DATA")
    return Path(env) if env else ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = _data_root()
    if not root.is_dir():
        msg = f"real data not found at {root} (set MTSCALE_DATA)"
        if os.environ.get("MTSCALE_REQUIRE_DATA") == "1":
            pytest.fail(msg + " but MTSCALE_REQUIRE_DATA=1")
        pytest.skip(msg)
    return root


@pytest.fixture(scope="session")
def ntu_dir(data_root: Path) -> Path:
    return data_root / "ntu_rgbd"


@pytest.fixture(scope="session")
def ucla_dir(data_root: Path) -> Path:
    return data_root / "nw_ucla" / "all_sqe"
