"""`hdopt lab equilibrium`: scale-invariant nets reach an equilibrium set by the intrinsic lr eta*lambda.

Claim (Li, Lyu & Arora, NeurIPS 2020): for SGD with lr eta and weight decay lambda on a scale-invariant net,
each weight's norm obeys ||w_{t+1}||^2 = (1 - eta lambda)^2 ||w_t||^2 + eta^2 ||g_t||^2 (g orthogonal to w),
so at equilibrium 2 eta lambda ||w||^2 ~ eta^2 ||g||^2, i.e.
  * the RMS angular update per step -> sqrt(2 eta lambda);
  * ||w|| is proportional to (eta / lambda)^(1/4): equal eta*lambda with eta/lambda 16x apart -> norm ratio 2;
  * the approach takes O(1 / (eta lambda)) steps; with g ~ 1/||w||, x = ||w||^2 obeys d(x^2)/dt = -4 eta
  lambda x^2
    + const, so starting k times larger delays equilibrium by ln(k) / (eta lambda) steps.

Recipe: three runs of a BN MLP (digits) on the same batch stream — A (eta, lambda), B (eta*f, lambda/f, same
eta*lambda), C (A with the initial weights multiplied by k) — measure angles and norms every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hdopt.dynamics.data import TensorData, batches, load_data
from hdopt.dynamics.experiments.common import full_loss, moving_average, thin, verdict_title
from hdopt.dynamics.models import scale_invariant_mlp
from hdopt.dynamics.norms import NormMonitor, equilibrium_angular_update
from hdopt.dynamics.registry import Experiment, register
from hdopt.dynamics.results import Check, LabResult, Timer, within
from hdopt.io import save_figure
from hdopt.plotting import pyplot


@dataclass
class EquilibriumConfig:
    """Attributes: data set, net (width, depth), SGD (batch, lr, weight_decay), the partner run's factor f
    (lr*f, wd/f), the init multiplier k of run C, the length in units of eta*lambda*t, tolerances, seed."""

    data: str = "digits"
    n_train: int | None = None
    width: int = 128
    depth: int = 2
    batch_size: int = 128
    lr: float = 0.4
    weight_decay: float = 1e-3
    partner_factor: float = 0.25
    init_scale: float = 8.0
    time_units: float = 8.0
    band: float = 0.1
    rel_tol: float = 0.15
    seed: int = 0

    @property
    def steps(self) -> int:
        return math.ceil(self.time_units / (self.lr * self.weight_decay))


PRESETS = {
    "smoke": EquilibriumConfig(n_train=300, width=32, lr=0.4, weight_decay=0.02, time_units=5.0,
                               rel_tol=0.3),
    "default": EquilibriumConfig(),
    "full": EquilibriumConfig(width=256, weight_decay=5e-4, time_units=10.0),
}


def train_run(config: EquilibriumConfig, data: TensorData, lr: float, weight_decay: float,
              init_scale: float) -> dict[str, np.ndarray]:
    """SGD + weight decay on a fresh scale-invariant MLP; per-step RMS angle over layers, total norm, loss."""
    model = scale_invariant_mlp(data.dim, config.width, data.num_classes, config.depth,
                                generator=torch.Generator().manual_seed(config.seed))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(init_scale)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
    monitor = NormMonitor({name: [p] for name, p in model.named_parameters()})
    gen = torch.Generator().manual_seed(config.seed + 1)
    stream = batches(data.train_x, data.train_y, config.batch_size, gen)
    angles, norms, losses = [], [], []
    for _ in tqdm(range(config.steps), desc=f"equilibrium lr={lr:g} wd={weight_decay:g} x{init_scale:g}",
                  disable=None, leave=False):
        x, y = next(stream)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        record = monitor.update()
        layer_angles = [v for k, v in record.items() if k.endswith("/angle")]
        angles.append(math.sqrt(np.mean(np.square(layer_angles))))
        norms.append(math.sqrt(sum(v**2 for k, v in record.items() if k.endswith("/norm"))))
        losses.append(loss.item())
    return {"angle": np.array(angles), "norm": np.array(norms), "loss": np.array(losses),
            "final_loss": full_loss(model, data.train_x, data.train_y)}


def tail_rms(values: np.ndarray, fraction: float = 0.25) -> float:
    """Root mean square of the last ``fraction`` of a series."""
    tail = values[-max(1, int(len(values) * fraction)):]
    return float(np.sqrt(np.mean(np.square(tail))))


def equilibrium_time(norms: np.ndarray, band: float, fraction: float = 0.25) -> int:
    """First step at which ||w||^2 comes within ``band`` (relative) of its mean over the last ``fraction``.

    ``||w||^2`` is smoothed over 1% of the run first (single noisy steps do not count). Returns the step index
    (``len(norms)`` if it never does).
    """
    sq = moving_average(np.square(norms), max(1, len(norms) // 100))
    target = float(np.mean(sq[-max(1, int(len(sq) * fraction)):]))
    inside = np.nonzero(np.abs(sq / target - 1.0) <= band)[0]
    return int(inside[0]) if len(inside) else len(norms)


def summarize(config: EquilibriumConfig, runs: dict[str, dict[str, np.ndarray]]) -> dict[str, float]:
    """The four measurements of runs A, B and C: the tail RMS angular update of A, the tail norm ratio A / B,
    and the times (in units of eta*lambda*t) at which A and C reach equilibrium."""
    lam_e = config.lr * config.weight_decay
    return {
        "angle": tail_rms(runs["A"]["angle"]),
        "norm_ratio": tail_rms(runs["A"]["norm"]) / tail_rms(runs["B"]["norm"]),
        "time_a": equilibrium_time(runs["A"]["norm"], config.band) * lam_e,
        "time_c": equilibrium_time(runs["C"]["norm"], config.band) * lam_e,
    }


def judge(config: EquilibriumConfig, m: dict[str, float]) -> list[Check]:
    """The predictions for ``config`` against the measurements ``m`` (see :func:`summarize`)."""
    f = config.partner_factor
    predicted_angle = equilibrium_angular_update(config.lr, config.weight_decay)
    predicted_ratio = (1.0 / f**2) ** 0.25
    predicted_delay = math.log(config.init_scale)
    delay = m["time_c"] - m["time_a"]
    return [
        Check("RMS angular update", predicted_angle, m["angle"],
              within(m["angle"], predicted_angle, config.rel_tol), f"within {config.rel_tol:.0%}"),
        Check(f"norm ratio (eta/lambda x{1 / f**2:g})", predicted_ratio, m["norm_ratio"],
              within(m["norm_ratio"], predicted_ratio, config.rel_tol), f"within {config.rel_tol:.0%}"),
        Check("eta*lambda*t to equilibrium", "O(1), in [0.25, 4]", m["time_a"], 0.25 <= m["time_a"] <= 4.0,
              "in [0.25, 4]"),
        Check(f"delay from {config.init_scale:g}x init (eta*lambda*t)", predicted_delay, delay,
              within(delay, predicted_delay, 2 * config.rel_tol), f"within {2 * config.rel_tol:.0%}"),
    ]  # fmt: skip


def run(config: EquilibriumConfig, out_dir: str | Path, data: TensorData | None = None) -> LabResult:
    """Run the three trainings, compare with the predictions, write results.json and equilibrium.png."""
    with Timer() as timer:
        data = data or load_data(config.data, config.n_train, seed=config.seed)
        lam_e = config.lr * config.weight_decay
        f = config.partner_factor
        runs = {
            "A": train_run(config, data, config.lr, config.weight_decay, 1.0),
            "B": train_run(config, data, config.lr * f, config.weight_decay / f, 1.0),
            "C": train_run(config, data, config.lr, config.weight_decay, config.init_scale),
        }
    checks = judge(config, summarize(config, runs))
    curves = {"eta_lambda_t": thin(np.arange(1, config.steps + 1) * lam_e)}
    for key, r in runs.items():
        curves[f"{key}/angle"] = thin(moving_average(r["angle"], max(1, config.steps // 100)))
        curves[f"{key}/norm"] = thin(r["norm"])
        curves[f"{key}/loss"] = thin(moving_average(r["loss"], max(1, config.steps // 100)))
        curves[f"{key}/final_train_loss"] = r["final_loss"]
    result = LabResult("equilibrium", config, checks, curves, timer.seconds, cpu_s=timer.cpu_seconds)
    result.plot = str(plot(result, Path(out_dir) / "equilibrium.png"))
    result.write(out_dir)
    return result


def plot(result: LabResult, path: Path) -> Path:
    """Three panels against eta*lambda*t: angular update (with sqrt(2 eta lambda)), weight norm, train
    loss."""
    plt = pyplot()
    c, cv = result.config, result.curves
    t = cv["eta_lambda_t"]
    f = c.partner_factor
    labels = {"A": f"A: lr {c.lr:g}, wd {c.weight_decay:g}",
              "B": f"B: lr {c.lr * f:g}, wd {c.weight_decay / f:g}",
              "C": f"C: as A, init x{c.init_scale:g}"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key, label in labels.items():
        axes[0].plot(t, cv[f"{key}/angle"], label=label)
        axes[1].plot(t, cv[f"{key}/norm"], label=label)
        axes[2].plot(t, cv[f"{key}/loss"], label=label)
    axes[0].axhline(equilibrium_angular_update(c.lr, c.weight_decay), color="k", ls="--",
                    label="predicted sqrt(2 eta lambda)")
    axes[0].set(title="angular update per step (RMS over layers)", xlabel="eta * lambda * t",
                ylabel="radians")
    axes[1].set(title="total weight norm", xlabel="eta * lambda * t", yscale="log")
    axes[2].set(title="train loss (minibatch, smoothed)", xlabel="eta * lambda * t")
    for ax in axes:
        ax.legend(fontsize=8)
    verdict_title(fig, result.verdict())
    return save_figure(fig, path)


register(Experiment("equilibrium", "angular update -> sqrt(2 eta lambda); norm ~ (eta/lambda)^(1/4); "
                    "equilibrium after O(1/(eta lambda)) steps, delayed by ln(init scale)",
                    EquilibriumConfig, PRESETS, run))
