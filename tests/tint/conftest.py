"""Shared fixtures of the TinT tests (model factories and oracles: tint_models.py / hdopt.tint.checks)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(params=["gpt2", "opt", "llama"])
def arch(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the CPU is shared (oversubscription costs 10x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
