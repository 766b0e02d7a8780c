"""One intra-op thread for the distributed tests: the 2-core machine is shared, and oversubscribed OpenMP
threads make tiny backward passes 10x slower. Worker processes get OMP_NUM_THREADS=1 from launch.py."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
