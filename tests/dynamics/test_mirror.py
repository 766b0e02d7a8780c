"""Reparametrized GD vs mirror descent, and the min-norm interpolants."""

import numpy as np
import pytest

from hdopt.dynamics.mirror import (
    gd_reparam,
    inverse_mirror_map,
    min_l1_interpolant,
    min_l2_interpolant,
    mirror_descent,
    mirror_map,
)


def problem(n=8, d=16, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    w = np.zeros(d)
    w[[2, 7]] = [1.5, -2.0]
    return X, X @ w, w


def test_mirror_map_inverse_and_potential_constant():
    z = np.linspace(-2, 2, 9)
    assert np.allclose(mirror_map(inverse_mirror_map(z, 0.3), 0.3), z)
    # psi'(w) = arcsinh(w / (2 alpha^2)) / 4
    assert mirror_map(np.array([2.0]), 1.0)[0] == pytest.approx(np.arcsinh(1.0) / 4)


def test_gd_on_uv_tracks_mirror_descent_with_error_linear_in_the_step():
    X, y, _ = problem()

    def gap(lr, steps):
        _, a = gd_reparam(X, y, 0.1, lr, steps, steps // 20)
        _, b = mirror_descent(X, y, 0.1, lr, steps, steps // 20)
        return max(np.linalg.norm(p - q) for p, q in zip(a, b, strict=True))

    g1, g2 = gap(0.004, 1000), gap(0.002, 2000)
    assert g1 < 0.05
    assert g1 / g2 == pytest.approx(2.0, rel=0.1)


def test_wrong_potential_does_not_track():
    X, y, _ = problem()
    lr, steps = 0.002, 2000
    w_gd, _ = gd_reparam(X, y, 0.1, lr, steps)
    w_md, _ = mirror_descent(X, y, 0.1, lr, steps)
    w_half, _ = mirror_descent(X, y, 0.1, lr / 2, steps)  # a potential off by 2x = half the speed
    assert np.linalg.norm(w_gd - w_md) < 0.1 * np.linalg.norm(w_gd - w_half)


def test_interpolants():
    X, y, w = problem()
    l1, l2 = min_l1_interpolant(X, y), min_l2_interpolant(X, y)
    assert np.allclose(X @ l1, y, atol=1e-7) and np.allclose(X @ l2, y)
    assert np.abs(l1).sum() <= np.abs(w).sum() + 1e-7
    assert np.linalg.norm(l2) <= np.linalg.norm(l1) + 1e-9
