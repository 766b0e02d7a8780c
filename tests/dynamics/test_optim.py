"""Normalized GD and GD on sqrt(L): one step against the formula, closures, state_dict."""

import pytest
import torch

from hdopt.dynamics.optim import NormalizedGD, SqrtLossGD


def problem():
    w = torch.nn.Parameter(torch.tensor([3.0, -4.0]))
    return w, lambda: (w - torch.tensor([1.0, 1.0])).pow(2).sum()


def test_normalized_gd_moves_exactly_lr():
    w, loss_fn = problem()
    opt = NormalizedGD([w], lr=0.1)
    before = w.detach().clone()
    opt.zero_grad()
    loss_fn().backward()
    g = w.grad.clone()
    opt.step()
    assert torch.allclose(w.detach(), before - 0.1 * g / g.norm())
    assert (w.detach() - before).norm().item() == pytest.approx(0.1, rel=1e-6)


def test_sqrt_loss_gd_step_and_closure():
    w, loss_fn = problem()
    opt = SqrtLossGD([w], lr=0.1)
    before = w.detach().clone()

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    loss = closure().item()
    g = w.grad.clone()
    opt.step(closure)
    assert torch.allclose(w.detach(), before - 0.1 * g / (2 * loss**0.5))
    with pytest.raises(ValueError, match="closure"):
        opt.step()


@pytest.mark.parametrize("cls", [NormalizedGD, SqrtLossGD])
def test_state_dict_round_trip_and_validation(cls):
    w, loss_fn = problem()
    opt = cls([w], lr=0.05)

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    other = cls([w], lr=1.0)
    other.load_state_dict(opt.state_dict())
    assert other.param_groups[0]["lr"] == 0.05
    assert other.state[w]["step"] == 3
    with pytest.raises(ValueError, match="lr"):
        cls([w], lr=0.0)


def test_normalized_gd_at_its_edge_of_stability_on_a_quadratic():
    # on L = (h/2) w^2 NGD oscillates around 0 with |w| ~ eta/2, where h * eta / |g| = 2
    w = torch.nn.Parameter(torch.tensor([1.005], dtype=torch.float64))
    opt, h = NormalizedGD([w], lr=0.01), 4.0
    for _ in range(300):
        opt.zero_grad()
        (0.5 * h * w.pow(2)).sum().backward()
        opt.step()
    assert abs(w.item()) == pytest.approx(0.005, rel=1e-6)
