"""`hdopt lab sde`: SGD and Adam follow SDEs, so their curves are kept by SVAG and by the right scaling rule.

Claims:
  * SVAG (Li, Malladi & Arora, NeurIPS 2021): with l in {1, 2, 4}, lr eta/l and l times the steps, the loss
    curves plotted against eta * steps / l coincide (they approximate one SDE; l = 1 is SGD itself), while
    plain SGD with lr eta/l and l times the steps (a quarter of the noise per unit time for l = 4) does not.
  * Square-root rule (Malladi, Lyu, Panigrahi & Arora, NeurIPS 2022): growing Adam's batch kappa = 4 times
  with
    lr * sqrt(kappa), 1 - beta -> kappa (1 - beta), eps / sqrt(kappa) keeps the loss curve against examples
    seen; the linear rule (lr * kappa) and no scaling do not.

Recipe: a ReLU MLP on digits with 20% label noise (noise makes the SDE's diffusion matter). Curves are the
full training loss at fixed fractions of the run; a gap is the mean absolute difference to the reference curve
divided by the mean of the reference curve. The gradient noise scale (per-sample variance vs squared mean
gradient) is reported at the start and end.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hdopt.dynamics.data import TensorData, batches, load_data
from hdopt.dynamics.experiments.common import full_loss, verdict_title
from hdopt.dynamics.hparams import scale_hparams, steps_for_batch
from hdopt.dynamics.models import relu_mlp
from hdopt.dynamics.noise_scale import gradient_noise_scale
from hdopt.dynamics.registry import Experiment, register
from hdopt.dynamics.results import Check, LabResult, Timer
from hdopt.dynamics.svag import SVAG
from hdopt.io import save_figure
from hdopt.plotting import pyplot

CE = torch.nn.functional.cross_entropy


@dataclass
class SDEConfig:
    """Attributes: data, label noise, net; SVAG part (SGD lr/batch/steps, values of l); Adam part (lr, betas,
    eps, batch, steps, kappa); evaluation points per run; examples for the noise scale; tolerances on the
    curve gaps; seed."""

    data: str = "digits"
    n_train: int | None = None
    label_noise: float = 0.2
    width: int = 128
    depth: int = 2
    sgd_lr: float = 0.2
    sgd_batch: int = 32
    sgd_steps: int = 1500
    svag_ls: tuple[int, ...] = (1, 2, 4)
    adam_lr: float = 1e-3
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    adam_batch: int = 32
    adam_steps: int = 4000
    kappa: float = 4.0
    evals: int = 40
    noise_examples: int = 1024
    svag_tol: float = 0.15
    rule_tol: float = 0.15
    seed: int = 0


PRESETS = {
    "smoke": SDEConfig(n_train=400, width=32, sgd_steps=1000, adam_steps=1200, evals=10, svag_tol=0.3,
                       rule_tol=0.2),
    "default": SDEConfig(),
    "full": SDEConfig(width=256, sgd_steps=4000, adam_steps=12000, svag_ls=(1, 2, 4, 8)),
}


def fresh_model(config: SDEConfig, data: TensorData) -> torch.nn.Module:
    """The same initialization for every run."""
    return relu_mlp(data.dim, config.width, data.num_classes, config.depth,
                    generator=torch.Generator().manual_seed(config.seed))


def eval_points(steps: int, evals: int) -> set[int]:
    """Steps after which the full training loss is recorded (evenly spaced, always including the last)."""
    return {round(steps * (i + 1) / evals) for i in range(evals)}


def run_svag(config: SDEConfig, data: TensorData, l: int) -> list[float]:
    """SGD wrapped by SVAG(l): lr sgd_lr / l for l * sgd_steps steps; training loss at the shared time
    points."""
    model = fresh_model(config, data)
    svag = SVAG(torch.optim.SGD(model.parameters(), lr=config.sgd_lr), l)
    gen = torch.Generator().manual_seed(config.seed + l)
    stream = batches(data.train_x, data.train_y, config.sgd_batch, gen)
    steps = l * config.sgd_steps
    points, losses = eval_points(steps, config.evals), []

    def closure() -> tuple[torch.Tensor, torch.Tensor]:
        (x1, y1), (x2, y2) = next(stream), next(stream)  # two independent batches
        return CE(model(x1), y1), CE(model(x2), y2)

    for t in tqdm(range(1, steps + 1), desc=f"svag l={l}", disable=None, leave=False):
        svag.step(closure)
        if t in points:
            losses.append(full_loss(model, data.train_x, data.train_y))
    return losses


def run_small_lr(config: SDEConfig, data: TensorData, l: int) -> list[float]:
    """Control: plain SGD, lr sgd_lr / l, l * sgd_steps steps (no variance amplification: less noise)."""
    model = fresh_model(config, data)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.sgd_lr / l)
    gen = torch.Generator().manual_seed(config.seed + 50)
    stream = batches(data.train_x, data.train_y, config.sgd_batch, gen)
    steps = l * config.sgd_steps
    return _train(model, optimizer, stream, steps, config, data, f"sgd lr/{l}")


def run_adam(config: SDEConfig, data: TensorData, opt_config: dict, batch: int, steps: int, label: str
             ) -> tuple[list[float], torch.nn.Module]:
    """Adam with ``opt_config`` at batch ``batch`` for ``steps`` steps; training loss at the shared points."""
    model = fresh_model(config, data)
    optimizer = torch.optim.Adam(model.parameters(), **opt_config)
    stream = batches(data.train_x, data.train_y, batch, torch.Generator().manual_seed(config.seed + 100))
    return _train(model, optimizer, stream, steps, config, data, f"adam {label}"), model


def _train(model, optimizer, stream, steps: int, config: SDEConfig, data: TensorData,
           desc: str) -> list[float]:
    """``steps`` minibatch steps of ``optimizer``; full training loss at the shared evaluation points."""
    points, losses = eval_points(steps, config.evals), []
    for t in tqdm(range(1, steps + 1), desc=desc, disable=None, leave=False):
        x, y = next(stream)
        optimizer.zero_grad()
        CE(model(x), y).backward()
        optimizer.step()
        if t in points:
            losses.append(full_loss(model, data.train_x, data.train_y))
    return losses


def curve_gap(curve: list[float], reference: list[float]) -> float:
    """Relative gap ``mean |curve - reference| / mean |reference|`` of two curves sampled at the same
    points."""
    ref = np.asarray(reference)
    return float(np.mean(np.abs(np.asarray(curve) - ref)) / np.mean(np.abs(ref)))


def judge(config: SDEConfig, m: dict) -> list[Check]:
    """Checks on the curve gaps ``m``: ``svag`` {l: gap to l = first}, ``control`` (plain SGD at lr/l_max),
    ``adam`` {"sqrt rule" | "linear rule" | "no scaling": gap to the baseline}."""
    first, l_max = config.svag_ls[0], max(config.svag_ls)
    checks = [Check(f"SVAG l={l} gap to l={first}", f"< {config.svag_tol:g}", gap, gap < config.svag_tol,
                    f"mean |dL| / mean L < {config.svag_tol:g}") for l, gap in m["svag"].items()]
    worst_svag = max(m["svag"].values(), default=float("nan"))
    checks.append(Check(f"control: SGD lr/{l_max}, {l_max}x steps, no SVAG", "> 2 x largest SVAG gap",
                        m["control"], m["control"] > 2 * worst_svag,
                        f"> 2 x {worst_svag:.3g} (the noise matters)"))
    gaps = m["adam"]
    checks.append(Check(f"Adam sqrt rule gap (kappa={config.kappa:g})", f"< {config.rule_tol:g}",
                        gaps["sqrt rule"], gaps["sqrt rule"] < config.rule_tol,
                        f"mean |dL| / mean L < {config.rule_tol:g}"))
    for name in ("linear rule", "no scaling"):
        checks.append(Check(f"Adam {name} gap", f"> {config.rule_tol:g}", gaps[name],
                            gaps[name] > config.rule_tol,
                            f"mean |dL| / mean L > {config.rule_tol:g} (the rule matters)"))
    return checks


def run(config: SDEConfig, out_dir: str | Path, data: TensorData | None = None) -> LabResult:
    """SVAG curves for each l, Adam under three batch-scaling choices; compare gaps with the tolerances."""
    with Timer() as timer:
        data = data or load_data(config.data, config.n_train, config.label_noise, seed=config.seed)
        svag = {l: run_svag(config, data, l) for l in config.svag_ls}
        small_lr = run_small_lr(config, data, max(config.svag_ls))

        base = {"lr": config.adam_lr, "betas": config.adam_betas, "eps": config.adam_eps}
        big_batch = round(config.kappa * config.adam_batch)
        big_steps = steps_for_batch(config.adam_steps, config.kappa)
        probe = data.train_x[:config.noise_examples], data.train_y[:config.noise_examples]
        noise_start = gradient_noise_scale(fresh_model(config, data), CE, *probe)
        adam = {"baseline": run_adam(config, data, base, config.adam_batch, config.adam_steps, "baseline")}
        noise_end = gradient_noise_scale(adam["baseline"][1], CE, *probe)
        for name, cfg in (("sqrt rule", scale_hparams(base, config.kappa, "sqrt")),
                          ("linear rule", scale_hparams(base, config.kappa, "linear")),
                          ("no scaling", dict(base))):
            adam[name] = run_adam(config, data, cfg, big_batch, big_steps, name)

    reference, baseline = svag[config.svag_ls[0]], adam["baseline"][0]
    measured = {
        "svag": {l: curve_gap(c, reference) for l, c in svag.items() if l != config.svag_ls[0]},
        "control": curve_gap(small_lr, reference),
        "adam": {name: curve_gap(curve, baseline) for name, (curve, _) in adam.items() if name != "baseline"},
    }
    checks = judge(config, measured)
    curves = {f"svag l={l}": c for l, c in svag.items()}
    curves[f"sgd lr/{max(config.svag_ls)} control"] = small_lr
    curves.update({f"adam {name}": c for name, (c, _) in adam.items()})
    curves["time_fraction"] = [(i + 1) / config.evals for i in range(config.evals)]
    curves["noise_scale"] = {"start": vars(noise_start), "end": vars(noise_end)}
    curves["adam_configs"] = {"sqrt rule": scale_hparams(base, config.kappa, "sqrt"),
                              "linear rule": scale_hparams(base, config.kappa, "linear"), "baseline": base}
    result = LabResult("sde", config, checks, curves, timer.seconds, cpu_s=timer.cpu_seconds)
    result.plot = str(plot(result, Path(out_dir) / "sde.png"))
    result.write(out_dir)
    return result


def plot(result: LabResult, path: Path) -> Path:
    """Left: SVAG curves against continuous time eta*steps/l; right: Adam curves against examples seen."""
    plt = pyplot()
    c, cv = result.config, result.curves
    frac = np.asarray(cv["time_fraction"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for l in c.svag_ls:
        axes[0].plot(frac * c.sgd_steps * c.sgd_lr, cv[f"svag l={l}"], marker=".", label=f"SVAG l={l}")
    l_max = max(c.svag_ls)
    axes[0].plot(frac * c.sgd_steps * c.sgd_lr, cv[f"sgd lr/{l_max} control"], ls=":", color="k",
                 label=f"control: plain SGD, lr/{l_max}, {l_max}x steps")
    axes[0].set(title=f"SVAG: SGD lr {c.sgd_lr:g}/l, batch {c.sgd_batch}, {c.label_noise:.0%} label noise",
                xlabel="time = lr * steps / l", ylabel="train loss")
    for name in ("baseline", "sqrt rule", "linear rule", "no scaling"):
        axes[1].plot(frac * c.adam_steps * c.adam_batch, cv[f"adam {name}"], marker=".",
                     label=name if name == "baseline" else f"batch x{c.kappa:g}, {name}")
    axes[1].set(title="Adam: batch x kappa with each scaling rule", xlabel="examples seen",
                ylabel="train loss")
    for ax in axes:
        ax.legend(fontsize=8)
    verdict_title(fig, result.verdict())
    return save_figure(fig, path)


register(Experiment("sde", "SVAG(l) curves coincide in lr*steps; Adam's sqrt scaling rule keeps the "
                    "loss curve when the batch grows 4x, the linear rule and no scaling do not",
                    SDEConfig, PRESETS, run))
