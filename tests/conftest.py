"""Shared test helpers: the offline benchmark data lives in ../shared/data relative to the repository root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data; fails under CI (CI=true) and skips elsewhere when it is missing."""
    if not (DATA_DIR / "MANIFEST.json").exists():
        message = f"benchmark data not found at {DATA_DIR} (expected ../shared/data next to the repository)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return DATA_DIR
