"""Weight decay == exponential lr on a scale-invariant net, in float64 to tight tolerance."""

import copy

import pytest
import torch

from hdopt.dynamics.explr import explr_alpha, explr_factor, make_explr_sgd
from hdopt.dynamics.models import scale_invariant_mlp


@pytest.mark.parametrize("lr,wd,momentum", [(0.1, 5e-3, 0.0), (0.1, 5e-3, 0.9), (0.5, 1e-2, 0.5)])
def test_alpha_solves_the_quadratic(lr, wd, momentum):
    a = explr_alpha(lr, wd, momentum)
    assert a**2 - (1 + momentum - lr * wd) * a + momentum == pytest.approx(0.0, abs=1e-14)
    assert 0 < a < 1


def test_alpha_without_momentum_and_errors():
    assert explr_alpha(0.1, 0.01) == pytest.approx(1 - 1e-3)
    assert explr_alpha(0.1, 0.0, 0.9) == pytest.approx(1.0)
    assert explr_factor(2, 0.5) == pytest.approx(32.0)
    with pytest.raises(ValueError, match="no real alpha"):
        explr_alpha(1.0, 0.5, 0.9)


def run_pair(momentum, steps=60, seed_buffers=True):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(24, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=gen)
    net = scale_invariant_mlp(6, 10, 3, eps=1e-30, dtype=torch.float64)
    twin = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=momentum, weight_decay=0.01)
    exp_opt, sched = make_explr_sgd(twin.parameters(), 0.2, 0.01, momentum)
    if not seed_buffers:
        exp_opt.state.clear()
    for _ in range(steps):
        idx = torch.randperm(24, generator=gen)[:12]
        for model, o in ((net, opt), (twin, exp_opt)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            o.step()
        sched.step()
    with torch.no_grad():
        return (net(x) - twin(x)).abs().max().item(), net, twin


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_weight_decay_and_exp_lr_give_the_same_function(momentum):
    diff, net, twin = run_pair(momentum)
    assert diff < 1e-10
    alpha = explr_alpha(0.2, 0.01, momentum)
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        assert torch.allclose(p, alpha**60 * q, rtol=1e-9, atol=1e-12)  # w_t = alpha^t w~_t


def test_momentum_needs_the_seeded_buffer():
    diff, _, _ = run_pair(0.9, seed_buffers=False)
    assert diff > 1e-6  # without the initial momentum the runs differ: the check can fail
