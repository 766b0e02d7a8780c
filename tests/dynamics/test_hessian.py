"""Lanczos, power iteration, Hutchinson and the model Hessian operator against known answers."""

import math

import pytest
import torch

from hdopt.dynamics.hessian import (
    CurvatureMonitor,
    HessianOperator,
    hessian_trace,
    hutchinson_trace,
    lanczos,
    power_iteration,
    sharpness,
)


def known_matrix(dim=60, seed=0):
    """Symmetric matrix with eigenvalues 10, 9, 8 then a spread in [-1, 3]."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    eigs = torch.cat([torch.tensor([10.0, 9.0, 8.0], dtype=torch.float64),
                      torch.linspace(-1, 3, dim - 3, dtype=torch.float64)])
    return q @ torch.diag(eigs) @ q.T, eigs


def test_lanczos_finds_top_eigenvalues_of_a_known_matrix():
    A, eigs = known_matrix()
    result = lanczos(lambda v: A @ v, 60, k=3, iters=30)
    assert result.eigenvalues == pytest.approx([10.0, 9.0, 8.0], rel=1e-8)
    assert result.matvecs == 30


def test_lanczos_full_krylov_space_is_exact():
    A, eigs = known_matrix(dim=12)
    result = lanczos(lambda v: A @ v, 12, k=12, iters=50)
    assert result.matvecs == 12
    assert result.eigenvalues == pytest.approx(sorted(eigs.tolist(), reverse=True), abs=1e-9)


def test_power_iteration_converges_slowly_but_surely():
    A, _ = known_matrix()
    result = power_iteration(lambda v: A @ v, 60, iters=400)
    assert result.eigenvalues[0] == pytest.approx(10.0, rel=1e-6)
    # with eigenvalue ratio 0.9 the error after 20 steps is still visible: Lanczos is much faster
    assert abs(result.history[19] - 10.0) > abs(lanczos(lambda v: A @ v, 60, iters=20).eigenvalues[0] - 10.0)


def test_hutchinson_is_exact_for_diagonal_and_unbiased_otherwise():
    D = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
    est, _ = hutchinson_trace(lambda v: D @ v, 10, samples=3)
    assert est == pytest.approx(55.0, abs=1e-12)  # z^T D z = tr(D) for Rademacher z
    A, eigs = known_matrix()
    est, err = hutchinson_trace(lambda v: A @ v, 60, samples=400, generator=torch.Generator().manual_seed(1))
    assert abs(est - float(eigs.sum())) < 4 * err


def quadratic_problem(n=50, d=6, seed=0):
    """Least squares: loss 0.5*mean((x.w - y)^2) has Hessian X^T X / n."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    model = torch.nn.Linear(d, 1, bias=False, dtype=torch.float64)

    def loss_fn(out, target):
        return 0.5 * (out - target).pow(2).mean()

    return model, loss_fn, X, y, X.T @ X / n


def test_hessian_operator_on_a_quadratic():
    model, loss_fn, X, y, H = quadratic_problem()
    op = HessianOperator(model, loss_fn, (X, y))
    v = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(op(v), H @ v, atol=1e-12)
    assert op.calls == 1
    top = torch.linalg.eigvalsh(H)[-1].item()
    assert sharpness(model, loss_fn, (X, y), iters=6)[0] == pytest.approx(top, rel=1e-9)
    trace, err = hessian_trace(model, loss_fn, (X, y), samples=200)
    assert abs(trace - H.trace().item()) < 4 * err + 1e-9


def test_dataset_average_equals_full_batch():
    model, loss_fn, X, y, H = quadratic_problem(n=50)
    split = [(X[:20], y[:20]), (X[20:], y[20:])]
    v = torch.ones(6, dtype=torch.float64)
    assert torch.allclose(HessianOperator(model, loss_fn, split)(v), H @ v, atol=1e-12)
    loss, grad = HessianOperator(model, loss_fn, split).loss_and_grad()
    assert loss == pytest.approx(loss_fn(model(X), y).item(), rel=1e-12)
    assert grad.shape == (6,)


def test_lanczos_rejects_non_finite_operators():
    with pytest.raises(FloatingPointError, match="diverge"):
        lanczos(lambda v: v * math.nan, 5)


def test_curvature_monitor_records_on_schedule():
    model, loss_fn, X, y, H = quadratic_problem()
    monitor = CurvatureMonitor(model, loss_fn, (X, y), every=5, k=2, iters=6, trace_samples=50)
    records = [monitor(step) for step in range(11)]
    assert [r["step"] for r in records if r] == [0, 5, 10]
    eigs = torch.linalg.eigvalsh(H).flip(0)[:2].tolist()
    assert monitor.history[0]["sharpness"] == pytest.approx(eigs, rel=1e-9)
    assert abs(monitor.history[0]["trace"] - H.trace().item()) < 4 * monitor.history[0]["trace_err"] + 1e-9
    with pytest.raises(ValueError, match="every"):
        CurvatureMonitor(model, loss_fn, (X, y), every=0)
