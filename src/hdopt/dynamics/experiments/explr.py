"""`hdopt lab explr`: weight decay equals an exponentially growing learning rate (Li & Arora, ICLR 2020).

Claim: on a scale-invariant net, SGD(lr eta, momentum gamma, weight decay lambda) and SGD(momentum gamma, no
weight decay, lr eta * alpha^(-2t-1)) produce the same functions at every step; alpha solves
x^2 - (1 + gamma - eta lambda) x + gamma = 0, and the weights differ only by the factor alpha^t.

Recipe: a BN MLP with exactly scale-invariant weights (batch norm without affine parameters, epsilon 1e-30),
in float64, trained both ways on the same batches, for gamma = 0 and gamma = 0.9; a control run with neither
weight decay nor the schedule shows how far apart unrelated runs drift. Outputs are compared on the test set.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hdopt.dynamics.data import TensorData, batches, load_data
from hdopt.dynamics.experiments.common import thin, verdict_title
from hdopt.dynamics.explr import explr_alpha, make_explr_sgd
from hdopt.dynamics.models import scale_invariant_mlp
from hdopt.dynamics.norms import weight_norm
from hdopt.dynamics.registry import Experiment, register
from hdopt.dynamics.results import Check, LabResult, Timer
from hdopt.io import save_figure
from hdopt.plotting import pyplot


@dataclass
class ExpLRConfig:
    """Attributes: data set, net, SGD (batch, lr, weight_decay), momenta to test, steps, comparison every
    ``eval_every`` steps, tolerance on the largest output difference, dtype name, seed."""

    data: str = "digits"
    n_train: int | None = 1000
    width: int = 64
    depth: int = 2
    batch_size: int = 64
    lr: float = 0.1
    weight_decay: float = 5e-3
    momenta: tuple[float, ...] = (0.0, 0.9)
    steps: int = 1000
    eval_every: int = 10
    tol: float = 1e-5
    dtype: str = "float64"
    bn_eps: float = 1e-30  # torch needs eps > 0; 1e-30 leaves invariance exact in float64
    seed: int = 0


PRESETS = {
    "smoke": ExpLRConfig(n_train=200, width=16, steps=100, eval_every=5),
    "default": ExpLRConfig(),
    "full": ExpLRConfig(n_train=None, width=128, steps=3000),
}


def train_pair(config: ExpLRConfig, data: TensorData, momentum: float) -> dict[str, list[float]]:
    """Train the weight-decay run, its exp-lr twin and a plain control on one batch stream; compare
    outputs."""
    dtype = getattr(torch, config.dtype)
    base = scale_invariant_mlp(data.dim, config.width, data.num_classes, config.depth, eps=config.bn_eps,
                               generator=torch.Generator().manual_seed(config.seed), dtype=dtype)
    wd_net, exp_net, plain_net = base, copy.deepcopy(base), copy.deepcopy(base)
    wd_opt = torch.optim.SGD(wd_net.parameters(), lr=config.lr, momentum=momentum,
                             weight_decay=config.weight_decay)
    exp_opt, exp_sched = make_explr_sgd(exp_net.parameters(), config.lr, config.weight_decay, momentum)
    plain_opt = torch.optim.SGD(plain_net.parameters(), lr=config.lr, momentum=momentum)
    alpha = explr_alpha(config.lr, config.weight_decay, momentum)
    test_x = data.test_x.to(dtype)
    stream = batches(data.train_x.to(dtype), data.train_y, config.batch_size,
                     torch.Generator().manual_seed(config.seed + 1))
    log: dict[str, list[float]] = {"step": [], "diff": [], "control_diff": [], "norm_wd": [], "norm_exp": [],
                                   "scale_error": []}
    for t in tqdm(range(1, config.steps + 1), desc=f"explr momentum={momentum:g}", disable=None, leave=False):
        x, y = next(stream)
        for net, opt in ((wd_net, wd_opt), (exp_net, exp_opt), (plain_net, plain_opt)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        exp_sched.step()
        if t % config.eval_every == 0 or t == config.steps:
            with torch.no_grad():
                out_wd, out_exp, out_plain = wd_net(test_x), exp_net(test_x), plain_net(test_x)
            norm_wd, norm_exp = weight_norm(wd_net.parameters()), weight_norm(exp_net.parameters())
            log["step"].append(t)
            log["diff"].append(float((out_wd - out_exp).abs().max()))
            log["control_diff"].append(float((out_wd - out_plain).abs().max()))
            log["norm_wd"].append(norm_wd)
            log["norm_exp"].append(norm_exp)
            # w_t = alpha^t * w~_t  =>  ||w_t|| / (alpha^t ||w~_t||) = 1
            log["scale_error"].append(abs(norm_wd / (alpha**t * norm_exp) - 1.0))
    return log


def summarize(logs: dict[float, dict[str, list[float]]]) -> dict[float, dict[str, float]]:
    """Per momentum: the largest output difference of the pair, of the weight-scale identity, and of the
    control over the run."""
    return {m: {"diff": max(log["diff"]), "scale_error": max(log["scale_error"]),
                "control": max(log["control_diff"])} for m, log in logs.items()}  # fmt: skip


def judge(config: ExpLRConfig, measured: dict[float, dict[str, float]]) -> list[Check]:
    """Three checks per momentum: outputs and weight scale agree within ``tol``; the control run does not."""
    checks = []
    for m, v in measured.items():
        checks.append(Check(f"max |output diff|, momentum {m:g}", f"< {config.tol:g}", v["diff"],
                            v["diff"] < config.tol, f"< {config.tol:g}"))
        checks.append(Check(f"max |w_t|/(alpha^t |w~_t|) - 1, momentum {m:g}", f"< {config.tol:g}",
                            v["scale_error"], v["scale_error"] < config.tol, f"< {config.tol:g}"))
        checks.append(Check(f"control (no wd, constant lr) diff, momentum {m:g}", "> 1e3 x tol", v["control"],
                            v["control"] > 1e3 * config.tol,
                            "> 1e3 x tol (the comparison can tell runs apart)"))
    return checks


def run(config: ExpLRConfig, out_dir: str | Path, data: TensorData | None = None) -> LabResult:
    """Train the pairs, check max |f_wd - f_explr| < tol (and the control is far), write results and plot."""
    with Timer() as timer:
        data = data or load_data(config.data, config.n_train, seed=config.seed)
        logs = {m: train_pair(config, data, m) for m in config.momenta}
    checks = judge(config, summarize(logs))
    curves = {f"momentum={m:g}/{k}": thin(v) for m, log in logs.items() for k, v in log.items()}
    curves["alpha"] = {f"momentum={m:g}": explr_alpha(config.lr, config.weight_decay, m)
                       for m in config.momenta}
    result = LabResult("explr", config, checks, curves, timer.seconds, cpu_s=timer.cpu_seconds)
    result.plot = str(plot(result, Path(out_dir) / "explr.png"))
    result.write(out_dir)
    return result


def plot(result: LabResult, path: Path) -> Path:
    """Left: largest output difference per step (log scale) vs the control; right: both weight norms."""
    plt = pyplot()
    cv, c = result.curves, result.config
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for m in c.momenta:
        key = f"momentum={m:g}"
        steps = cv[f"{key}/step"]
        axes[0].semilogy(steps, np.maximum(cv[f"{key}/diff"], 1e-300), label=f"wd vs exp-lr, {key}")
        axes[0].semilogy(steps, cv[f"{key}/control_diff"], ls=":", label=f"wd vs plain SGD, {key}")
        axes[1].semilogy(steps, cv[f"{key}/norm_wd"], label=f"weight decay, {key}")
        axes[1].semilogy(steps, cv[f"{key}/norm_exp"], ls="--", label=f"exp lr, {key}")
    axes[0].axhline(c.tol, color="k", ls="--", label=f"tolerance {c.tol:g}")
    axes[0].set(title=f"max |output difference| on the test set ({c.dtype})", xlabel="step")
    axes[1].set(title="weight norm: decays with wd, grows with exp lr", xlabel="step")
    for ax in axes:
        ax.legend(fontsize=8)
    verdict_title(fig, result.verdict())
    return save_figure(fig, path)


register(Experiment("explr", "weight decay + constant lr == no weight decay + lr eta*alpha^(-2t-1) "
                    "(same functions)", ExpLRConfig, PRESETS, run))
