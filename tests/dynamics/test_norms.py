"""Norms, angular updates, effective/intrinsic lr, and the monitor callback."""

import math

import pytest
import torch

from hdopt.dynamics.norms import (
    NormMonitor,
    angular_update,
    effective_lr,
    equilibrium_angular_update,
    intrinsic_lr,
    weight_norm,
)


@pytest.mark.parametrize("theta", [1e-6, 0.01, 0.5, 2.0, math.pi - 1e-3])
def test_angular_update_recovers_a_known_rotation(theta):
    a = torch.tensor([3.0, 0.0, 0.0])
    b = 2.5 * torch.tensor([math.cos(theta), math.sin(theta), 0.0], dtype=torch.float64)
    assert angular_update([a], [b]) == pytest.approx(theta, rel=1e-6)


def test_angle_ignores_scale_and_treats_tensors_as_one_vector():
    a, b = [torch.ones(2), torch.zeros(2)], [torch.zeros(2), torch.ones(2)]
    assert angular_update(a, [7 * t for t in a]) == pytest.approx(0.0, abs=1e-7)
    assert angular_update(a, b) == pytest.approx(math.pi / 2)
    assert weight_norm([torch.ones(4), torch.ones(5)]) == pytest.approx(3.0)


def test_learning_rate_formulas():
    assert effective_lr(0.4, 2.0) == pytest.approx(0.1)
    assert intrinsic_lr(0.4, 1e-3) == pytest.approx(4e-4)
    assert equilibrium_angular_update(0.4, 1e-3) == pytest.approx(math.sqrt(8e-4))


def test_monitor_records_each_step_of_an_optimizer():
    w = torch.nn.Parameter(torch.tensor([1.0, 0.0]))
    opt = torch.optim.SGD([w], lr=0.5)
    monitor = NormMonitor(opt)
    w.grad = torch.tensor([0.0, -2.0])
    opt.step()  # w = (1, 1): 45 degrees, norm sqrt 2
    record = monitor.update()
    assert record["group0/angle"] == pytest.approx(math.pi / 4)
    assert record["group0/norm"] == pytest.approx(math.sqrt(2))
    assert record["group0/eff_lr"] == pytest.approx(0.25)
    assert len(monitor.history) == 1
