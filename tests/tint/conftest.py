"""Shared fixtures of the TinT tests (model factories live in tint_models.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["gpt2", "opt", "llama"])
def arch(request) -> str:
    return request.param
