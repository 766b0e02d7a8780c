"""`hdopt lab eos`: full-batch gradient descent trains at the edge of stability.

Claims:
  * Cohen et al., ICLR 2021: with lr eta, the sharpness (top Hessian eigenvalue) of the training loss rises
    during training ("progressive sharpening") until it reaches 2/eta, then hovers there while the loss keeps
    falling non-monotonically.
  * Arora, Li & Panigrahi, ICML 2022: for normalized GD (w <- w - eta g/||g||) the stable step is
    eta/||g||, so the edge of stability is sharpness * eta / ||g|| = 2; for GD on sqrt(L) (step
    eta grad L / (2 sqrt L)) it is sharpness * eta / (2 sqrt L) = 2, and once there the iterate moves along
    the minimizer manifold reducing sharpness.

Recipe: a tanh MLP with squared loss 0.5 * mean_i ||f(x_i) - onehot(y_i)||^2 on 1,000 digits, trained with
full batch GD at two learning rates, with normalized GD and with GD on sqrt(L); sharpness by Lanczos on
Hessian-vector products every ``measure_every`` steps. "Settled" values are taken over the last ``tail`` of
each run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hdopt.dynamics.data import TensorData, load_data
from hdopt.dynamics.experiments.common import verdict_title
from hdopt.dynamics.hessian import HessianOperator, lanczos
from hdopt.dynamics.models import tanh_mlp
from hdopt.dynamics.optim import NormalizedGD, SqrtLossGD
from hdopt.dynamics.registry import Experiment, register
from hdopt.dynamics.results import Check, LabResult, Timer, within
from hdopt.io import save_figure
from hdopt.plotting import pyplot


def half_mse(output: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """0.5 * mean over examples of the squared distance to the one-hot target."""
    return 0.5 * (output - onehot).pow(2).sum(1).mean()


@dataclass
class EoSConfig:
    """Attributes: data subset, net, the GD learning rates, normalized-GD lr, steps, measurement cadence,
    Lanczos iterations, the settled tail fraction, relative tolerance, seed."""

    data: str = "digits"
    n_train: int = 1000
    width: int = 64
    depth: int = 2
    lrs: tuple[float, ...] = (0.2, 0.4)
    ngd_lr: float = 0.01
    sqrt_lr: float = 0.2
    steps: int = 2000
    ngd_steps: int = 2000
    sqrt_steps: int = 1500
    measure_every: int = 20
    lanczos_iters: int = 20
    tail: float = 0.3
    rel_tol: float = 0.1
    seed: int = 0


PRESETS = {
    "smoke": EoSConfig(n_train=300, width=32, lrs=(0.5, 0.6), ngd_lr=0.03, sqrt_lr=0.5, steps=300,
                       ngd_steps=300, sqrt_steps=300, measure_every=20, lanczos_iters=10, rel_tol=0.2),
    "default": EoSConfig(),
    "full": EoSConfig(width=128, lrs=(0.1, 0.2), steps=8000, ngd_steps=8000, sqrt_steps=8000,
                      measure_every=40),
}


def train(config: EoSConfig, data: TensorData, optimizer_name: str, lr: float, steps: int) -> dict[str, list]:
    """Full-batch training from the shared init; logs loss every step, sharpness and ||grad|| when
    measured."""
    x, y = data.train_x, torch.nn.functional.one_hot(data.train_y, data.num_classes).to(data.train_x.dtype)
    model = tanh_mlp(data.dim, config.width, data.num_classes, config.depth,
                     generator=torch.Generator().manual_seed(config.seed))
    optimizers = {"gd": torch.optim.SGD, "ngd": NormalizedGD, "sqrt": SqrtLossGD}
    opt = optimizers[optimizer_name](model.parameters(), lr=lr)
    log: dict[str, list] = {"loss": [], "step": [], "sharpness": [], "grad_norm": [], "measured_loss": []}
    for t in tqdm(range(steps + 1), desc=f"eos {optimizer_name} lr={lr:g}", disable=None, leave=False):
        if t % config.measure_every == 0:
            op = HessianOperator(model, half_mse, (x, y))
            gen = torch.Generator().manual_seed(t)
            top = lanczos(op, op.dim, 1, config.lanczos_iters, gen).eigenvalues[0]
            log["step"].append(t)
            log["sharpness"].append(top)
            loss_value, grad = op.loss_and_grad()
            log["grad_norm"].append(float(grad.norm()))
            log["measured_loss"].append(loss_value)
        if t == steps:
            break
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = half_mse(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{optimizer_name} with lr {lr:g} diverged at step {t}; lower the lr")
        log["loss"].append(loss.item())
    return log


def tail_values(values: list[float], tail: float) -> np.ndarray:
    """The last ``tail`` fraction of a series (at least one entry)."""
    return np.asarray(values[-max(1, int(len(values) * tail)):])


def summarize(config: EoSConfig, gd: dict[float, dict[str, list]], ngd_ratio: list[float],
              sqrt_ratio: list[float], sqrt_sharpness: list[float]) -> dict:
    """The settled values the checks read: per GD lr the initial and settled (median of the tail) sharpness;
    the settled edge ratios of normalized GD and GD on sqrt(L); GD on sqrt(L)'s final / peak sharpness and
    whether its peak came before the end."""
    peak = int(np.argmax(sqrt_sharpness))
    return {
        "gd": {lr: {"initial": log["sharpness"][0],
                    "settled": float(np.median(tail_values(log["sharpness"], config.tail)))}
               for lr, log in gd.items()},
        "ngd_ratio": float(np.median(tail_values(ngd_ratio, config.tail))),
        "sqrt_ratio": float(np.median(tail_values(sqrt_ratio, config.tail))),
        "sqrt_drop": sqrt_sharpness[-1] / sqrt_sharpness[peak],
        "sqrt_peak_before_end": peak < len(sqrt_sharpness) - 1,
    }  # fmt: skip


def judge(config: EoSConfig, m: dict) -> list[Check]:
    """The edge-of-stability predictions against the settled values ``m`` (see :func:`summarize`)."""
    checks = []
    for lr, v in m["gd"].items():
        checks.append(Check(f"GD lr {lr:g}: initial sharpness below 2/eta", f"< {2 / lr:.3g}", v["initial"],
                            v["initial"] < 2 / lr, "progressive sharpening has room to act"))
        checks.append(Check(f"GD lr {lr:g}: settled sharpness", 2 / lr, v["settled"],
                            within(v["settled"], 2 / lr, config.rel_tol), f"median of last {config.tail:.0%} "
                            f"within {config.rel_tol:.0%} of 2/eta"))
    tail = f"median of last {config.tail:.0%} within {2 * config.rel_tol:.0%} of 2"
    checks.append(Check(f"normalized GD lr {config.ngd_lr:g}: sharpness * eta / ||g||", 2.0, m["ngd_ratio"],
                        within(m["ngd_ratio"], 2.0, 2 * config.rel_tol), tail))
    checks.append(Check(f"GD on sqrt(L) lr {config.sqrt_lr:g}: sharpness * eta / (2 sqrt L)", 2.0,
                        m["sqrt_ratio"], within(m["sqrt_ratio"], 2.0, 2 * config.rel_tol), tail))
    checks.append(Check("GD on sqrt(L): final / peak sharpness", "< 0.9 (sharpness reduction)",
                        m["sqrt_drop"], m["sqrt_drop"] < 0.9 and m["sqrt_peak_before_end"], "< 0.9"))
    return checks


def run(config: EoSConfig, out_dir: str | Path, data: TensorData | None = None) -> LabResult:
    """GD at each lr and normalized GD; compare settled sharpness with 2/eta (and 2||g||/eta for NGD)."""
    with Timer() as timer:
        data = data or load_data(config.data, config.n_train, seed=config.seed)
        gd = {lr: train(config, data, "gd", lr, config.steps) for lr in config.lrs}
        ngd = train(config, data, "ngd", config.ngd_lr, config.ngd_steps)
        sqrt = train(config, data, "sqrt", config.sqrt_lr, config.sqrt_steps)
    ratio = np.asarray(ngd["sharpness"]) * config.ngd_lr / np.maximum(np.asarray(ngd["grad_norm"]), 1e-30)
    # GD on sqrt(L) steps with lr / (2 sqrt(L)): its edge is sharpness * lr / (2 sqrt(L)) = 2
    sqrt_ratio = np.asarray(sqrt["sharpness"]) * config.sqrt_lr / (2 * np.sqrt(sqrt["measured_loss"]))
    checks = judge(config, summarize(config, gd, ratio.tolist(), sqrt_ratio.tolist(), sqrt["sharpness"]))
    curves = {f"gd lr={lr:g}/{k}": v for lr, log in gd.items() for k, v in log.items()}
    curves.update({f"sqrt lr={config.sqrt_lr:g}/{k}": v for k, v in sqrt.items()})
    curves[f"sqrt lr={config.sqrt_lr:g}/ratio"] = sqrt_ratio.tolist()
    curves.update({f"ngd lr={config.ngd_lr:g}/{k}": v for k, v in ngd.items()})
    curves[f"ngd lr={config.ngd_lr:g}/ratio"] = ratio.tolist()
    result = LabResult("eos", config, checks, curves, timer.seconds, cpu_s=timer.cpu_seconds)
    result.plot = str(plot(result, Path(out_dir) / "eos.png"))
    result.write(out_dir)
    return result


def plot(result: LabResult, path: Path) -> Path:
    """Left: training loss; middle: sharpness with 2/eta lines; right: normalized GD's sharpness*eta/||g||."""
    plt = pyplot()
    c, cv = result.config, result.curves
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for i, lr in enumerate(c.lrs):
        color = f"C{i}"
        axes[0].semilogy(cv[f"gd lr={lr:g}/loss"], color=color, label=f"GD lr {lr:g}")
        axes[1].plot(cv[f"gd lr={lr:g}/step"], cv[f"gd lr={lr:g}/sharpness"], color=color,
                     label=f"GD lr {lr:g}")
        axes[1].axhline(2 / lr, color=color, ls="--", label=f"2/eta = {2 / lr:g}")
    key = f"ngd lr={c.ngd_lr:g}"
    axes[0].semilogy(cv[f"{key}/loss"], color="C3", label=f"normalized GD lr {c.ngd_lr:g}")
    axes[2].plot(cv[f"{key}/step"], cv[f"{key}/ratio"], color="C3", label="NGD: sharpness * eta / ||g||")
    axes[2].plot(cv[f"{key}/step"], np.asarray(cv[f"{key}/sharpness"]) / max(cv[f"{key}/sharpness"]),
                 color="C4", ls=":", label="NGD: sharpness / its max")
    key = f"sqrt lr={c.sqrt_lr:g}"
    axes[0].semilogy(cv[f"{key}/loss"], color="C5", label=f"GD on sqrt(L) lr {c.sqrt_lr:g}")
    axes[2].plot(cv[f"{key}/step"], cv[f"{key}/ratio"], color="C5",
                 label="sqrt(L): sharpness * eta / (2 sqrt L)")
    axes[2].plot(cv[f"{key}/step"], np.asarray(cv[f"{key}/sharpness"]) / max(cv[f"{key}/sharpness"]),
                 color="C6", ls=":", label="sqrt(L): sharpness / its max")
    axes[2].axhline(2.0, color="k", ls="--", label="predicted 2")
    axes[0].set(title="training loss (full batch)", xlabel="step")
    axes[1].set(title="sharpness (Lanczos) rises to 2/eta and stays", xlabel="step")
    axes[2].set(title="normalized GD and GD on sqrt(L) at their edge", xlabel="step")
    for ax in axes:
        ax.legend(fontsize=8)
    verdict_title(fig, result.verdict())
    return save_figure(fig, path)


register(Experiment("eos", "full-batch GD sharpness rises and settles at 2/eta; normalized GD and GD on "
                    "sqrt(L) settle at their own edge (= 2); GD on sqrt(L) then reduces sharpness",
                    EoSConfig, PRESETS, run))
