"""Per-sample gradients and the noise scale on linear regression, where both are known in closed form."""

import pytest
import torch

from hdopt.dynamics.noise_scale import gradient_noise_scale, per_sample_grads


def setup():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(40, 1, generator=gen, dtype=torch.float64)
    model = torch.nn.Linear(5, 1, bias=False, dtype=torch.float64)

    def loss_fn(out, target):
        return 0.5 * (out - target).pow(2).mean()

    return model, loss_fn, X, y


def test_per_sample_gradients_match_the_formula():
    model, loss_fn, X, y = setup()
    g = per_sample_grads(model, loss_fn, X, y, chunk=16)
    w = model.weight.detach().reshape(-1)
    expected = X * (X @ w - y.reshape(-1)).unsqueeze(1)  # g_i = x_i (x_i.w - y_i)
    assert torch.allclose(g, expected, atol=1e-12)


def test_noise_scale_from_the_formula():
    model, loss_fn, X, y = setup()
    w = model.weight.detach().reshape(-1)
    g = X * (X @ w - y.reshape(-1)).unsqueeze(1)
    result = gradient_noise_scale(model, loss_fn, X, y)
    assert result.grad_sq_norm == pytest.approx(g.mean(0).pow(2).sum().item(), rel=1e-10)
    assert result.trace_cov == pytest.approx(g.var(0, unbiased=True).sum().item(), rel=1e-10)
    assert result.b_simple == pytest.approx(result.trace_cov / result.grad_sq_norm)
    assert result.n == 40
    with pytest.raises(ValueError, match="two"):
        gradient_noise_scale(model, loss_fn, X[:1], y[:1])
