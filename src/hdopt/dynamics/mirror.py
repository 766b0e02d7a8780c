"""Reparametrized regression w = u*u - v*v and the mirror descent it equals (Li, Wang, Lee & Arora, NeurIPS
2022).

Gradient flow on (u, v) for L(u*u - v*v) from u_0 = v_0 = alpha (elementwise) gives, with g = grad L(w),
u' = -2 u g and v' = 2 v g, hence u = alpha e^{-2G}, v = alpha e^{2G} with G = integral of g, and

    w = alpha^2 (e^{-4G} - e^{4G}) = -2 alpha^2 sinh(4G)
    <=>  d/dt grad psi(w) = -grad L(w),   grad psi(w) = (1/4) arcsinh(w / (2 alpha^2)).

So the flow is mirror descent with this potential. psi interpolates between l1 (alpha -> 0: the flow picks the
minimum-l1 interpolant, i.e. a sparse one) and l2 (alpha -> infinity: the minimum-l2 interpolant).
Here both dynamics are discretized with the same step eta; they agree up to O(eta).
"""

from __future__ import annotations

import numpy as np


def mirror_map(w: np.ndarray, alpha: float) -> np.ndarray:
    """grad psi(w) = (1/4) arcsinh(w / (2 alpha^2))."""
    return 0.25 * np.arcsinh(w / (2 * alpha**2))


def inverse_mirror_map(z: np.ndarray, alpha: float) -> np.ndarray:
    """(grad psi)^{-1}(z) = 2 alpha^2 sinh(4 z)."""
    return 2 * alpha**2 * np.sinh(4 * z)


def squared_loss_grad(X: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Gradient of L(w) = ||X w - y||^2 / (2 n)."""
    return X.T @ (X @ w - y) / len(y)


def gd_reparam(X: np.ndarray, y: np.ndarray, alpha: float, lr: float, steps: int,
               record_every: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Gradient descent on (u, v) for L(u*u - v*v), u_0 = v_0 = alpha:  u -= 2 lr u g,  v += 2 lr v g.

    Args:
        X, y: design ``(n, d)`` and targets ``(n,)``.
        alpha: initialization scale.
        lr: step size on (u, v).
        steps: number of steps.
        record_every: store w every this many steps (0: only the end).

    Returns:
        ``(w_final, trajectory)``.
    """
    u = np.full(X.shape[1], float(alpha))
    v = u.copy()
    trajectory = []
    for t in range(steps):
        g = squared_loss_grad(X, y, u * u - v * v)
        u, v = u - 2 * lr * u * g, v + 2 * lr * v * g
        if record_every and (t + 1) % record_every == 0:
            trajectory.append(u * u - v * v)
    return u * u - v * v, trajectory


def mirror_descent(X: np.ndarray, y: np.ndarray, alpha: float, lr: float, steps: int,
                   record_every: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Mirror descent ``grad psi(w_{t+1}) = grad psi(w_t) - lr * grad L(w_t)`` from w_0 = 0.

    Args: as in :func:`gd_reparam`.

    Returns:
        ``(w_final, trajectory)``.
    """
    z = np.zeros(X.shape[1])
    trajectory = []
    for t in range(steps):
        z = z - lr * squared_loss_grad(X, y, inverse_mirror_map(z, alpha))
        if record_every and (t + 1) % record_every == 0:
            trajectory.append(inverse_mirror_map(z, alpha))
    return inverse_mirror_map(z, alpha), trajectory


def min_l1_interpolant(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """argmin ||w||_1 subject to X w = y, as a linear program over w = p - q with p, q >= 0 (scipy HiGHS)."""
    from scipy.optimize import linprog

    n, d = X.shape
    res = linprog(np.ones(2 * d), A_eq=np.hstack([X, -X]), b_eq=y, bounds=(0, None), method="highs")
    if not res.success:
        raise RuntimeError(f"min-l1 linear program failed: {res.message}")
    return res.x[:d] - res.x[d:]


def min_l2_interpolant(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """argmin ||w||_2 subject to X w = y: the pseudo-inverse solution."""
    return np.linalg.pinv(X) @ y
