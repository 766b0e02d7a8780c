"""`hdopt lab mirror`: reparametrizing w = u*u - v*v turns gradient descent into mirror descent.

Claim (Li, Wang, Lee & Arora, NeurIPS 2022; Woodworth et al. 2020): gradient flow on (u, v) from u = v = alpha
is mirror descent on w with grad psi(w) = (1/4) arcsinh(w / (2 alpha^2)). Hence on an underdetermined linear
regression, small alpha converges to the minimum-l1 interpolant (sparse) and large alpha to the minimum-l2
one.

Recipe: n = 40 Gaussian measurements of a 5-sparse w* in d = 100 dimensions; for each alpha run GD on (u, v)
and mirror descent with the same step; compare the trajectories (their gap must shrink like the step:
halving the step halves it) and the limits with the min-l1 (linear program) and min-l2 (pseudo-inverse)
solutions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hdopt.dynamics.experiments.common import verdict_title
from hdopt.dynamics.mirror import gd_reparam, min_l1_interpolant, min_l2_interpolant, mirror_descent
from hdopt.dynamics.registry import Experiment, register
from hdopt.dynamics.results import Check, LabResult, Timer
from hdopt.io import save_figure
from hdopt.plotting import pyplot


@dataclass
class MirrorConfig:
    """Attributes: problem size (n, d, sparsity k), init scales, base step (divided by max(1, alpha^2) to stay
    stable), steps, steps of the step-halving comparison, tolerances, seed."""

    n: int = 40
    d: int = 100
    k: int = 5
    alphas: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
    lr: float = 0.004
    steps: int = 50000
    compare_steps: int = 5000
    traj_tol: float = 0.05
    l1_tol: float = 0.05
    l2_tol: float = 0.01
    seed: int = 0


PRESETS = {
    "smoke": MirrorConfig(n=20, d=40, k=3, alphas=(0.01, 10.0), lr=0.01, steps=6000, compare_steps=1000,
                          traj_tol=0.1,
                          l1_tol=0.1, l2_tol=0.05),
    "default": MirrorConfig(),
    "full": MirrorConfig(n=100, d=400, k=10, alphas=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
                         steps=200000),
}


def sparse_problem(config: MirrorConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian design ``(n, d)``, a k-sparse w* with entries +-U[1, 3], and y = X w*."""
    rng = np.random.default_rng(config.seed)
    X = rng.standard_normal((config.n, config.d))
    w_star = np.zeros(config.d)
    support = rng.choice(config.d, config.k, replace=False)
    w_star[support] = rng.choice([-1.0, 1.0], config.k) * rng.uniform(1.0, 3.0, config.k)
    return X, X @ w_star, w_star


def trajectory_gap(X: np.ndarray, y: np.ndarray, alpha: float, lr: float, steps: int) -> float:
    """max_t ||w_GD(t) - w_MD(t)|| / ||w_MD(end)|| over ``steps`` steps (100 recorded points)."""
    every = max(1, steps // 100)
    _, gd = gd_reparam(X, y, alpha, lr, steps, every)
    w_md, md = mirror_descent(X, y, alpha, lr, steps, every)
    gap = max(float(np.linalg.norm(a - b)) for a, b in zip(gd, md, strict=True))
    return gap / float(np.linalg.norm(w_md))


def judge(config: MirrorConfig, m: dict[str, float]) -> list[Check]:
    """Checks on ``m``: the worst GD-vs-MD gap over alphas, the gap's ratio when the step halves, the l1 norm
    of the smallest alpha's limit over the minimum, the largest alpha's distance to the min-l2 solution."""
    small, large = min(config.alphas), max(config.alphas)
    return [
        Check("max GD-vs-MD trajectory gap (relative)", f"< {config.traj_tol:g}", m["worst_gap"],
              m["worst_gap"] < config.traj_tol, f"< {config.traj_tol:g} for every alpha"),
        Check(f"gap(step)/gap(step/2) at alpha {small:g}", 2.0, m["halving"], 1.6 <= m["halving"] <= 2.4,
              "in [1.6, 2.4]: the gap is discretization error, O(step)"),
        Check(f"alpha {small:g}: ||w||_1 / min ||w||_1", 1.0, m["l1_ratio"],
              abs(m["l1_ratio"] - 1) < config.l1_tol, f"within {config.l1_tol:.0%}"),
        Check(f"alpha {large:g}: ||w - w_min_l2|| / ||w_min_l2||", 0.0, m["l2_dist"],
              m["l2_dist"] < config.l2_tol, f"< {config.l2_tol:g}"),
    ]


def run(config: MirrorConfig, out_dir: str | Path, data: object = None) -> LabResult:
    """Sweep alpha; check GD == MD (gap O(step)), small alpha -> min-l1, large alpha -> min-l2."""
    if data is not None:
        raise ValueError("the mirror experiment builds its own sparse regression problem; it takes no data")
    with Timer() as timer:
        X, y, w_star = sparse_problem(config)
        w_l1, w_l2 = min_l1_interpolant(X, y), min_l2_interpolant(X, y)
        finals, gaps, snapshots = {}, {}, {}
        for alpha in config.alphas:
            lr = config.lr / max(1.0, alpha**2)
            every = max(1, config.steps // 200)
            w_gd, traj_gd = gd_reparam(X, y, alpha, lr, config.steps, every)
            w_md, traj_md = mirror_descent(X, y, alpha, lr, config.steps, every)
            finals[alpha] = w_gd
            gaps[alpha] = max(float(np.linalg.norm(a - b)) for a, b in zip(traj_gd, traj_md, strict=True)) \
                / float(np.linalg.norm(w_md))
            snapshots[alpha] = (np.stack(traj_gd), np.stack(traj_md))
        small, large = min(config.alphas), max(config.alphas)
        lr_small = config.lr / max(1.0, small**2)
        halving = trajectory_gap(X, y, small, lr_small, config.compare_steps) / trajectory_gap(
            X, y, small, lr_small / 2, 2 * config.compare_steps)
    checks = judge(config, {
        "worst_gap": max(gaps.values()),
        "halving": halving,
        "l1_ratio": float(np.abs(finals[small]).sum() / np.abs(w_l1).sum()),
        "l2_dist": float(np.linalg.norm(finals[large] - w_l2) / np.linalg.norm(w_l2)),
    })
    curves = {
        "alphas": list(config.alphas),
        "l1_norm": [float(np.abs(finals[a]).sum()) for a in config.alphas],
        "dist_to_min_l1": [_rel_dist(finals[a], w_l1) for a in config.alphas],
        "dist_to_min_l2": [_rel_dist(finals[a], w_l2) for a in config.alphas],
        "residual": [float(np.linalg.norm(X @ finals[a] - y)) for a in config.alphas],
        "gd_md_gap": [gaps[a] for a in config.alphas],
        "min_l1_norm": float(np.abs(w_l1).sum()), "min_l2_l1_norm": float(np.abs(w_l2).sum()),
        "true_l1_norm": float(np.abs(w_star).sum()),
        "w_star": w_star.tolist(), "w_small_alpha": finals[small].tolist(),
        "w_large_alpha": finals[large].tolist(),
    }
    result = LabResult("mirror", config, checks, curves, timer.seconds, cpu_s=timer.cpu_seconds)
    result.plot = str(plot(result, snapshots, Path(out_dir) / "mirror.png"))
    result.write(out_dir)
    return result


def _rel_dist(w: np.ndarray, target: np.ndarray) -> float:
    return float(np.linalg.norm(w - target) / np.linalg.norm(target))


def plot(result: LabResult, snapshots: dict, path: Path) -> Path:
    """Left: ||w||_1 of the limit vs alpha; middle: limits vs w*; right: GD and MD trajectories overlaid."""
    plt = pyplot()
    c, cv = result.config, result.curves
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    axes[0].semilogx(cv["alphas"], cv["l1_norm"], "o-", label="GD on u*u - v*v")
    axes[0].axhline(cv["min_l1_norm"], color="C2", ls="--", label="min-l1 interpolant")
    axes[0].axhline(cv["min_l2_l1_norm"], color="C3", ls="--", label="min-l2 interpolant")
    axes[0].set(title="||w||_1 of the limit", xlabel="init scale alpha")
    axes[1].stem(cv["w_star"], linefmt="k-", markerfmt="ko", basefmt=" ", label="w* (5-sparse)")
    axes[1].plot(cv["w_small_alpha"], "C0.", label=f"alpha {min(c.alphas):g}")
    axes[1].plot(cv["w_large_alpha"], "C3x", label=f"alpha {max(c.alphas):g}")
    axes[1].set(title="limits: coordinates", xlabel="coordinate")
    alpha = min(c.alphas)  # the slow, incremental (sparse) regime shows the most of the trajectory
    gd, md = snapshots[alpha]
    top = np.argsort(-np.abs(gd[-1]))[:5]
    for j, i in enumerate(top):
        axes[2].plot(gd[:, i], color=f"C{j}", label=f"GD w[{i}]" if j == 0 else None)
        axes[2].plot(md[:, i], color=f"C{j}", ls="--", label="mirror descent" if j == 0 else None)
    axes[2].set(title=f"trajectories, alpha {alpha:g} (solid GD, dashed MD)", xlabel="recorded step")
    for ax in axes:
        ax.legend(fontsize=8)
    verdict_title(fig, result.verdict())
    return save_figure(fig, path)


register(Experiment("mirror", "GD on w = u*u - v*v equals mirror descent with "
                    "psi' = arcsinh(w/(2 alpha^2))/4; "
                    "small alpha -> min-l1 (sparse), large alpha -> min-l2", MirrorConfig, PRESETS, run))
