import pytest
import torch

from hdopt.memory import peak_mib, reset_peak, tensor_peak_bytes


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


def test_tensor_peak_counts_what_the_call_allocates_and_holds():
    x = torch.ones(1000, 1000)  # allocated before the call: not counted

    def work():
        y = x.clone()  # 4 MB
        z = y * 2  # 4 MB more while y is alive: the peak
        del y
        w = torch.empty(250_000)  # 1 MB after y was freed: no new peak
        return z.sum() + w.numel()

    result, peak = tensor_peak_bytes(work)
    assert result.item() == 2e6 + 250_000
    assert 8_000_000 <= peak <= 8_000_000 + 4096  # the two 4 MB tensors, plus scalars
