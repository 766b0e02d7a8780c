"""Report sections built from ``hdopt lab`` experiments: the implicit bias of training and Local SGD."""

from __future__ import annotations

import torch

from hdopt.dynamics.registry import get
from hdopt.dynamics.results import LabResult
from hdopt.report.claims import Claim, Section, Table, fmt, verdict_of_checks
from hdopt.report.context import Context

# (experiment, title, the paper's statement)
IMPLICIT_BIAS = (
    (
        "equilibrium",
        "Normalization + weight decay reach an equilibrium",
        "Li, Lyu & Arora (NeurIPS 2020): with scale-invariant weights, the angular update per step tends to "
        "sqrt(2 eta lambda) and the weight norm to (eta/lambda)^(1/4) up to a constant, whatever the init",
    ),
    (
        "explr",
        "Weight decay is an exponentially growing learning rate",
        "Li & Arora (ICLR 2020): on a scale-invariant loss, SGD with weight decay lambda and momentum gamma "
        "gives the same network functions as SGD without weight decay and lr eta * alpha^(-2t-1)",
    ),
    (
        "sde",
        "SDE scaling rules: the square-root rule for Adam",
        "Malladi, Lyu, Panigrahi & Arora (NeurIPS 2022): when the batch grows kappa times, Adam keeps its "
        "loss curve with lr x sqrt(kappa), 1 - beta x kappa, eps / sqrt(kappa); the linear rule does not",
    ),
    (
        "eos",
        "Edge of stability",
        "Cohen et al. (ICLR 2021): full-batch GD's sharpness rises to 2/eta and hovers there while the loss "
        "falls; Arora, Li & Panigrahi (ICML 2022): normalized GD and GD on sqrt(L) settle at their own edge",
    ),
    (
        "mirror",
        "Reparametrization is mirror descent",
        "Li, Wang, Lee & Arora (NeurIPS 2022): GD on w = u*u - v*v equals mirror descent with "
        "psi'(w) = arcsinh(w / (2 alpha^2)) / 4; small alpha gives the sparse (min-l1) solution",
    ),
)
LOCAL_SGD = (
    "Gu, Lyu, Huang & Arora (ICLR 2023): Local SGD with a small lr and long training drifts to flatter "
    "minima than SGD with the same global batch, faster as eta*H grows (their digits-scale check: Hessian "
    "trace 42.0 / 34.9 / 29.7 at H = 1 / 16 / 128)"
)
QSR = (
    "Gu, Lyu, Arora, Zhang & Huang (ICLR 2024): with a decaying lr, the Quadratic Synchronization Rule "
    "H = max(H_base, floor((alpha/eta)^2)) reaches equal or better test accuracy than constant H = H_base "
    "with fewer synchronizations, and better accuracy than a constant H with the same communication "
    "(ImageNet: ResNet-152 and ViT-B, Local SGD and Local AdamW)"
)


# The report's quick scale runs the lab's default presets, except where one alone would take minutes:
# equilibrium at eta*lambda = 1.6e-3 (3,750 steps; default 4e-4, 20,000 steps), width 64.
QUICK_OVERRIDES = {"equilibrium": {"width": 64, "weight_decay": 4e-3, "time_units": 6.0}}


def lab_config(ctx: Context, name: str):
    """The config ``name`` runs with at the report's scale (its lab preset, plus the quick overrides)."""
    overrides = QUICK_OVERRIDES.get(name, {}) if ctx.scale == "quick" else {}
    return get(name).config(ctx.budget.lab_scale, seed=ctx.seed, **overrides)


def lab_command(ctx: Context, name: str) -> str:
    """The ``hdopt lab`` command line that runs the same config."""
    overrides = QUICK_OVERRIDES.get(name, {}) if ctx.scale == "quick" else {}
    extra = (" --set " + " ".join(f"{k}={v}" for k, v in overrides.items())) if overrides else ""
    return f"hdopt lab {name} --scale {ctx.budget.lab_scale} --seed {ctx.seed}{extra}"


def run_experiment(ctx: Context, name: str) -> LabResult:
    """Run lab experiment ``name`` into ``runs/lab/NAME``, on one thread (tiny models: more threads only
    contend)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return get(name).run(lab_config(ctx, name), ctx.section_dir(f"lab/{name}"))
    finally:
        torch.set_num_threads(threads)


def _predicted(check) -> str:
    return check.predicted if isinstance(check.predicted, str) else fmt(check.predicted)


def claim_from(ctx: Context, result: LabResult, title: str, paper: str, checks=None) -> Claim:
    """A claim whose verdict is the experiment's own predicted-vs-measured checks."""
    checks = result.checks if checks is None else checks
    passed = [c.passed for c in checks]
    table = Table(["check", "predicted", "measured", "acceptance", "ok"],
                  [[c.name, _predicted(c),
                    fmt(c.measured),
                    c.tolerance, "yes" if c.passed else "no"] for c in checks])  # fmt: skip
    return Claim(
        title=title, claim=get(result.name).claim,
        paper=f"{paper}. Predicted for this run: " + "; ".join(f"{c.name}: {_predicted(c)}" for c in checks),
        measured="; ".join(f"{c.name}: {fmt(c.measured)}" for c in checks),
        verdict=verdict_of_checks(checks),
        why=f"{sum(passed)} of {len(passed)} predictions met within their stated tolerance",
        command=lab_command(ctx, result.name),
        tables=[table], plots=[ctx.rel(result.plot)] if result.plot else [],
    )  # fmt: skip


def implicit_bias(ctx: Context, progress=None) -> Section:
    """Section 1: the five implicit-bias experiments."""
    claims = []
    for name, title, paper in IMPLICIT_BIAS:
        if progress:
            progress(f"implicit bias: {name}")
        claims.append(claim_from(ctx, run_experiment(ctx, name), title, paper))
    return Section("implicit_bias", "The implicit bias of training",
                   "Normalization, weight decay and the learning rate; SDE scaling rules; edge of stability; "
                   "reparametrization. Small models on scikit-learn's digits; each prediction is a formula "
                   "evaluated on the run's own settings.", claims, ctx.scale, ctx.settings())  # fmt: skip


def local_sgd(ctx: Context, progress=None) -> Section:
    """Section 2: Local SGD's flatter minima and QSR, with K simulated workers."""
    if progress:
        progress("local SGD")
    result = run_experiment(ctx, "localsgd")
    sharp = [c for c in result.checks if not c.name.startswith("QSR")]
    qsr = [c for c in result.checks if c.name.startswith("QSR")]
    claims = [
        claim_from(ctx, result, "Local SGD finds flatter minima as H grows", LOCAL_SGD, sharp),
        claim_from(ctx, result, "QSR: the accuracy of constant H with fewer synchronizations", QSR, qsr),
    ]
    claims[1].plots = []  # one figure serves both claims
    return Section("local_sgd", "Local SGD",
                   f"K = {result.config.workers} simulated workers (mathematically identical to K "
        "processes on "
                   "torch.distributed), a ReLU MLP on digits with label noise; sharpness and Hessian "
        "trace of "
                   "the averaged model.", claims, ctx.scale, ctx.settings())  # fmt: skip
