import pytest
import torch

from hdopt.memory import peak_mib, reset_peak


def test_peak_is_measured_per_phase():
    if not reset_peak():
        pytest.skip("this OS does not allow resetting the peak RSS (/proc/self/clear_refs)")
    big = torch.ones(64 * 2**20 // 4 * 4)  # 256 MiB of float32, touched
    assert big[-1] == 1
    with_big = peak_mib()
    del big
    reset_peak()
    after = peak_mib()
    assert with_big - after > 200  # the reset forgot the 256 MiB peak of the earlier phase
