"""`hdopt lab localsgd`: Local SGD finds flatter minima than SGD; QSR beats constant H on communication.

Claims:
  * Gu, Lyu, Huang & Arora, ICLR 2023: with a small lr and long training, Local SGD (K workers, H local steps)
    drifts toward flatter minima than parallel SGD with the same global batch (H = 1), faster as eta*H grows:
    the Hessian trace at the end falls as H grows.
  * Gu, Lyu, Arora, Zhang & Huang, ICLR 2024 (QSR): with a decaying lr, the Quadratic Synchronization Rule
    H_t = max(H_base, floor((alpha/eta_t)^2)) reaches equal or better test accuracy than constant H = H_base
    with fewer synchronizations, and better test accuracy than a constant H that synchronizes as often as
    QSR does.

Recipe: a ReLU MLP on digits with label noise (noise is what drives the drift), K simulated workers, each
with its own batches; every run starts from the same init. Part 1: constant lr, H in ``periods``. Part 2:
cosine lr; constant H = ``qsr_base``, QSR, and constant H = steps // (QSR's synchronizations), the constant
period with at least QSR's communication. At the end the workers are averaged and measured on the full
(noisy) training loss: Hessian trace (Hutchinson), sharpness (Lanczos), and clean test accuracy.

The workers are driven by :class:`hdopt.distributed.LocalSGD` in its simulated mode (K replicas in this
process), the same engine that runs one replica per rank under torchrun. The dependency points one way:
this experiment uses ``hdopt.distributed``; ``hdopt.distributed`` knows nothing of the lab.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from hdopt.distributed import Communicator, LocalSGD, LocalSGDConfig, parameter_bytes, worker_seed
from hdopt.dynamics.data import TensorData, load_data
from hdopt.dynamics.experiments.common import accuracy, full_loss
from hdopt.dynamics.hessian import HessianOperator, hutchinson_trace, lanczos
from hdopt.dynamics.models import relu_mlp
from hdopt.dynamics.registry import Experiment, register
from hdopt.dynamics.results import Check, LabResult, Timer
from hdopt.io import save_figure
from hdopt.plotting import pyplot

CE = nn.functional.cross_entropy


@dataclass
class LocalSGDLabConfig:
    """Attributes: data, label noise, net; K workers, per-worker batch, lr, steps; part 1 periods; part 2
    cosine peak lr, QSR H_base and alpha, and the accuracy difference that still counts as "equal";
    evaluation points, Hutchinson samples, Lanczos iterations; seed."""

    data: str = "digits"
    n_train: int | None = None
    label_noise: float = 0.1
    width: int = 128
    depth: int = 2
    workers: int = 8
    batch: int = 32
    lr: float = 0.1
    steps: int = 2048
    periods: tuple[int, ...] = (1, 16, 128)
    cosine_lr: float = 0.2
    qsr_base: int = 4
    qsr_alpha: float = 0.1
    equal_accuracy: float = 0.01
    evals: int = 8
    trace_samples: int = 50
    lanczos_iters: int = 20
    seed: int = 0


PRESETS = {
    "smoke": LocalSGDLabConfig(workers=4, steps=256, periods=(1, 4, 32), width=32, evals=2, trace_samples=10,
                               lanczos_iters=8),
    "default": LocalSGDLabConfig(),
    "full": LocalSGDLabConfig(steps=6144, trace_samples=100),
}


class Workers:
    """K simulated Local SGD workers with their own data streams, and the measurements on their average."""

    def __init__(self, config: LocalSGDLabConfig, data: TensorData, local: LocalSGDConfig, lr: float):
        net = relu_mlp(data.dim, config.width, data.num_classes, config.depth,
                       generator=torch.Generator().manual_seed(config.seed))
        self.config, self.data = config, data
        self.models = [copy.deepcopy(net) for _ in range(config.workers)]
        self.opts = [torch.optim.SGD(m.parameters(), lr=lr) for m in self.models]
        self.gens = [torch.Generator().manual_seed(worker_seed(config.seed, k))
                     for k in range(config.workers)]
        self.sgd = LocalSGD(self.models, self.opts, local, Communicator.single())

    def step(self) -> float:
        x, y = self.data.train_x, self.data.train_y
        losses = []
        for model, opt, gen in zip(self.models, self.opts, self.gens, strict=True):
            idx = torch.randint(0, len(y), (self.config.batch,), generator=gen)
            opt.zero_grad()
            loss = CE(model(x[idx]), y[idx])
            loss.backward()
            losses.append(loss.item())
        self.sgd.step()
        return sum(losses) / len(losses)

    def average(self) -> nn.Module:
        """A model holding the workers' mean weights (the workers are left as they are)."""
        avg = copy.deepcopy(self.models[0])
        with torch.no_grad():
            for ps in zip(avg.parameters(), *(m.parameters() for m in self.models), strict=True):
                ps[0].copy_(torch.stack(ps[1:]).mean(0))
        return avg

    def measure(self, trace_samples: int, lanczos_iters: int) -> dict[str, float]:
        model, d = self.average(), self.data
        op = HessianOperator(model, CE, (d.train_x, d.train_y))
        trace, err = hutchinson_trace(op, op.dim, trace_samples, torch.Generator().manual_seed(1))
        top = lanczos(op, op.dim, 1, lanczos_iters, torch.Generator().manual_seed(2)).eigenvalues[0]
        return {"trace": trace, "trace_err": err, "sharpness": top,
                "train_loss": full_loss(model, d.train_x, d.train_y),
                "test_acc": accuracy(model, d.test_x, d.test_y)}


def train(config: LocalSGDLabConfig, data: TensorData, local: LocalSGDConfig, cosine: bool,
          label: str) -> dict:
    """One run; measurements at ``evals`` evenly spaced points (the last on the averaged final model)."""
    lr = config.cosine_lr if cosine else config.lr
    workers = Workers(config, data, local, lr)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(workers.opts[0], config.steps) if cosine else None)
    marks = {round(config.steps * (i + 1) / config.evals) for i in range(config.evals)}
    log: dict[str, list] = {"step": [], "trace": [], "sharpness": [], "test_acc": [], "train_loss": []}
    for t in tqdm(range(1, config.steps + 1), desc=f"localsgd {label}", disable=None, leave=False):
        workers.step()
        if sched is not None:
            sched.step()
        if t in marks:
            final = t == config.steps
            m = workers.measure(config.trace_samples if final else max(5, config.trace_samples // 5),
                                config.lanczos_iters)
            log["step"].append(t)
            for key in ("trace", "sharpness", "test_acc", "train_loss"):
                log[key].append(m[key])
            if final:
                log["final"] = m
    sgd = workers.sgd
    log["syncs"] = len(sgd.rounds)
    log["periods"] = [r.period for r in sgd.rounds]
    log["bytes_per_step"] = sgd.comm_bytes_per_step()
    log["param_bytes"] = parameter_bytes(workers.models[0])
    return log


def matched_period(steps: int, syncs: int) -> int:
    """The constant H whose rounds over ``steps`` steps number at least ``syncs`` (as close as possible)."""
    return max(1, steps // max(1, syncs))


def judge(config: LocalSGDLabConfig, m: dict) -> list[Check]:
    """The two papers' predictions against the final measurements ``m``.

    ``m["traces"]``: final Hessian trace per H of part 1 (in ``periods`` order). ``m["constant"]``,
    ``m["qsr"]``, ``m["matched"]``: ``{"syncs", "test_acc"}`` of the cosine runs with constant H = H_base,
    QSR, and the constant H with at least QSR's synchronizations (``m["matched_period"]``).
    """
    traces = m["traces"]
    # the smallest decrease of the trace from one H to the next (NaN when any trace is NaN)
    smallest_drop = float(-np.max(np.diff(traces))) if len(traces) > 1 else float("nan")
    h_lo, h_hi = config.periods[0], config.periods[-1]
    const, qsr, matched = m["constant"], m["qsr"], m["matched"]
    vs_base = qsr["test_acc"] - const["test_acc"]
    vs_matched = qsr["test_acc"] - matched["test_acc"]
    return [
        Check(f"Hessian trace falls as H grows (H = {', '.join(map(str, config.periods))}): smallest drop",
              "> 0", smallest_drop, smallest_drop > 0,
              f"trace at H={h_lo}: {traces[0]:.3g} -> H={h_hi}: {traces[-1]:.3g}, strictly decreasing"),
        Check(f"QSR minus constant H={config.qsr_base} test accuracy ({qsr['syncs']} vs {const['syncs']} "
              "syncs)", f">= -{config.equal_accuracy:g}, with fewer syncs", vs_base,
              qsr["syncs"] < const["syncs"] and vs_base >= -config.equal_accuracy,
              f"equal (within {config.equal_accuracy:g}) or better accuracy with fewer synchronizations"),
        Check(f"QSR minus constant H={m['matched_period']} test accuracy ({qsr['syncs']} vs "
              f"{matched['syncs']} syncs)", "> 0", vs_matched,
              matched["syncs"] >= qsr["syncs"] and vs_matched > 0,
              "better accuracy than a constant H that synchronizes at least as often"),
    ]  # fmt: skip


def summarize(config: LocalSGDLabConfig, part1: dict[int, dict], cosine: dict[str, dict],
              period: int) -> dict:
    """The measurements :func:`judge` reads, from the runs' logs."""
    final = {key: {"syncs": log["syncs"], "test_acc": log["final"]["test_acc"]}
             for key, log in cosine.items()}  # fmt: skip
    return {"traces": [part1[h]["final"]["trace"] for h in config.periods], "matched_period": period, **final}


def run(config: LocalSGDLabConfig, out_dir: str | Path, data: TensorData | None = None) -> LabResult:
    """Part 1 (constant lr, H in ``periods``) and part 2 (cosine lr: H_base, QSR, H matching QSR's syncs)."""
    with Timer() as timer:
        data = data or load_data(config.data, config.n_train, config.label_noise, config.seed)
        part1 = {h: train(config, data, LocalSGDConfig(period=h), False, f"H={h}") for h in config.periods}
        constant = train(config, data, LocalSGDConfig(period=config.qsr_base), True,
                         f"cosine H={config.qsr_base}")
        qsr = train(config, data, LocalSGDConfig(period=config.qsr_base, schedule="qsr",
                                                 qsr_alpha=config.qsr_alpha, max_period=config.steps),
                    True, "cosine QSR")
        period = matched_period(config.steps, qsr["syncs"])
        matched = train(config, data, LocalSGDConfig(period=period), True, f"cosine H={period}")
    cosine = {"constant": constant, "qsr": qsr, "matched": matched}
    checks = judge(config, summarize(config, part1, cosine, period))
    curves = {f"H={h}": log for h, log in part1.items()}
    curves[f"cosine H={config.qsr_base}"] = constant
    curves["cosine QSR"] = qsr
    curves[f"cosine H={period} (QSR's syncs)"] = matched
    result = LabResult("localsgd", config, checks, curves, timer.seconds, cpu_s=timer.cpu_seconds)
    result.plot = str(plot(result, Path(out_dir) / "localsgd.png"))
    result.write(out_dir)
    return result


def plot(result: LabResult, path: Path) -> Path:
    """Left: Hessian trace over training per H; middle: test accuracy; right: the QSR period per round."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for i, (label, log) in enumerate(result.curves.items()):
        style = "--" if label.startswith("cosine") else "-"
        axes[0].plot(log["step"], log["trace"], style, color=f"C{i}", marker="o", ms=3, label=label)
        axes[1].plot(log["step"], log["test_acc"], style, color=f"C{i}", marker="o", ms=3, label=label)
    for i, label in enumerate(k for k in result.curves if k.startswith("cosine")):
        periods = result.curves[label]["periods"]
        ends = [sum(periods[: j + 1]) for j in range(len(periods))]
        axes[2].step(ends, periods, where="pre", color=f"C{len(result.config.periods) + i}",
                     label=f"{label}: {len(periods)} syncs")
    axes[0].set(title="Hessian trace of the averaged model", xlabel="step", yscale="log")
    axes[1].set(title="test accuracy (clean labels)", xlabel="step")
    axes[2].set(title="local steps per round (cosine lr)", xlabel="step", ylabel="H", yscale="log")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(result.verdict()[:200], fontsize=8)
    return save_figure(fig, path)


def _lab_claim() -> str:
    return ("Local SGD lowers the Hessian trace as H grows; QSR matches constant-H accuracy with fewer "
            "synchronizations and beats a constant H with as many")


EXPERIMENT = Experiment("localsgd", _lab_claim(), LocalSGDLabConfig, PRESETS, run)
register(EXPERIMENT)

__all__ = ["EXPERIMENT", "LocalSGDLabConfig", "PRESETS", "run"]
