"""SVAG: coefficients, the combined gradient, l = 1 is SGD, state round trip."""

import copy

import pytest
import torch

from hdopt.dynamics.svag import SVAG, svag_coefficients


@pytest.mark.parametrize("l", [1, 2, 4, 16])
def test_coefficients_keep_the_mean_and_multiply_the_variance(l):
    c1, c2 = svag_coefficients(l)
    assert c1 + c2 == pytest.approx(1.0)
    assert c1**2 + c2**2 == pytest.approx(l)


def test_invalid_l():
    with pytest.raises(ValueError, match="l >= 1"):
        svag_coefficients(0.5)


def setup(l):
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x1, x2 = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    return model, SVAG(torch.optim.SGD(model.parameters(), lr=0.3), l), x1, x2


def test_step_uses_lr_over_l_and_the_combined_gradient():
    model, svag, x1, x2 = setup(4)
    before = copy.deepcopy(model)
    c1, c2 = svag_coefficients(4)
    svag.step(lambda: (model(x1).pow(2).mean(), model(x2).pow(2).mean()))
    # expected: w - (0.3 / 4) * grad(c1 L1 + c2 L2)
    loss = c1 * before(x1).pow(2).mean() + c2 * before(x2).pow(2).mean()
    grads = torch.autograd.grad(loss, list(before.parameters()))
    for p, q, g in zip(model.parameters(), before.parameters(), grads, strict=True):
        assert torch.allclose(p, q - 0.075 * g, atol=1e-7)
    assert svag.param_groups[0]["lr"] == pytest.approx(0.075)
    assert svag.base_lrs() == pytest.approx([0.3])


def test_l1_is_plain_sgd_on_the_first_batch():
    model, svag, x1, x2 = setup(1)
    twin = copy.deepcopy(model)
    svag.step(lambda: (model(x1).sum(), model(x2).sum()))  # c2 = 0 for l = 1
    opt = torch.optim.SGD(twin.parameters(), lr=0.3)
    twin(x1).sum().backward()
    opt.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.allclose(p, q)


def test_state_dict_round_trip_and_closure_required():
    model, svag, x1, x2 = setup(2)
    state = svag.state_dict()
    _, other, _, _ = setup(2)
    other.load_state_dict(state)
    assert other.param_groups[0]["lr"] == svag.param_groups[0]["lr"]
    _, wrong_l, _, _ = setup(4)
    with pytest.raises(ValueError, match="l=2"):
        wrong_l.load_state_dict(state)
    with pytest.raises(ValueError, match="closure"):
        svag.step(None)
