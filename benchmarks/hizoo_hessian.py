"""How far HiZOO's diagonal Hessian estimate ``D`` moves on SmolLM2-135M, per smoothing constant.

    PYTHONPATH=src python benchmarks/hizoo_hessian.py [--steps 66] [--lr 1e-4] [--hessian-smooth 1e-8 ...]

Runs the whole-model HiZOO choice of benchmarks/zo_convergence.py (SST-2 protocol: 1000 train / 100 dev
examples, 64 tokens, batch 16, data seed 0, seed 0; lr 1e-4, eps 1e-3, 66 steps = its 198 forwards) once,
in a temporary folder, then replays its trajectory from the starting weights (:func:`hdopt.zo.replay`, which
rebuilds ``D`` bitwise) and measures ``D`` over every trained coordinate. Each step multiplies a coordinate's
``D`` by ``1 - a + a |h_t| z^2`` (``a`` the smoothing constant, ``h_t`` the step's second difference over
``2 eps^2``, recorded in the trajectory, ``z ~ N(0, 1)``), so ``D`` can only tell coordinates apart once
``a |h_t|`` adds up. Dev accuracy every 17 steps, as in the grid. Saves benchmarks/results/hizoo_hessian.json,
one entry per smoothing constant (a run keeps the others'): ``|h_t|`` and ``a |h_t|`` over the steps, the
measured spread of ``D`` and ``log D``, the best dev accuracy and the test accuracy at it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import zo_convergence  # benchmarks/, this script's folder: the grid's protocol and plan
from hdopt.finetune import rundir
from hdopt.finetune.config import RunConfig
from hdopt.finetune.methods import get_method
from hdopt.finetune.trained import run_config, run_start
from hdopt.finetune.trainer import finetune
from hdopt.io import atomic_write_json
from hdopt.zo import replay

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "hizoo_hessian.json"
CHOICE = "hizoo-lr0.0001"  # the whole-model HiZOO grid's choice on SST-2 (docs/finetune.md)


def train(folder: Path, steps: int, lr: float, alpha: float) -> dict:
    """:data:`CHOICE`'s run (its protocol and flags from benchmarks/zo_convergence.py's plan) at ``steps``,
    ``lr`` and smoothing constant ``alpha``, in ``folder``."""
    run = next(r for r in zo_convergence.PLANS["sst2"] if r["name"] == CHOICE)
    fields = {**zo_convergence.PROTOCOL, **run["flags"], "task": run["task"], "seed": run["seed"],
              "steps": steps, "lr": lr, "optimizer_args": {"hessian_smooth": alpha},
              "data_dir": zo_convergence.DATA_DIR, "output_dir": str(folder), "progress": False}  # fmt: skip
    results, _ = finetune(RunConfig().replace(**fields))
    return results


def hessian_spread(folder: Path, trajectory) -> dict:
    """``D`` rebuilt by replaying ``(header, trajectory)``: its spread over every trained coordinate."""
    cfg = run_config(folder)
    _, _, _, params = run_start(folder, cfg, get_method(cfg.method.method))
    opt = replay(params, trajectory)
    flat = torch.cat([opt.hessian(p) for _, p in params]).double()
    logs = flat.log()
    return {"coordinates": flat.numel(), "mean": flat.mean().item(), "std": flat.std().item(),
            "min": flat.min().item(), "max": flat.max().item(), "log_std": logs.std().item(),
            "fraction_off_by_1pct": ((flat - 1).abs() > 0.01).double().mean().item()}  # fmt: skip


def curvatures(trajectory) -> tuple[float, list[float]]:
    """The smoothing constant and each step's ``|h_t|`` (a record's extras: ``h_1 .. h_q``, then ``a``)."""
    records = list(trajectory[1])
    return records[0].extras[-1], [abs(r.extras[0]) for r in records]


def measure(steps: int, lr: float, alpha: float) -> dict:
    """One run at smoothing constant ``alpha``, then ``D`` from its replay."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "hizoo"
        results = train(folder, steps, lr, alpha)
        trajectory = rundir.load_trajectory(folder / rundir.TRAJECTORY)
        recorded, h = curvatures(trajectory)
        spread = hessian_spread(folder, trajectory)
    weights = [recorded * v for v in h]
    return {
        "steps": len(h), "hessian_smooth": recorded, "lr": lr,
        "abs_h": {"median": statistics.median(h), "min": min(h), "max": max(h)},
        "alpha_abs_h": {"median": statistics.median(weights), "max": max(weights), "sum": math.fsum(weights)},
        "D": spread, "best_dev": results.get("best_dev"), "best_step": results.get("best_step"),
        "test_at_best_dev": results.get("test"), "seconds": round(time.perf_counter() - start, 1),
    }  # fmt: skip


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--steps", type=int, default=66)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--hessian-smooth", type=float, nargs="+", default=[1e-8])
    args = parser.parse_args()
    saved = json.loads(OUT.read_text()) if OUT.is_file() else {}
    runs = saved.get("runs", {})
    for alpha in args.hessian_smooth:
        row = measure(args.steps, args.lr, alpha)
        row["command"] = ("PYTHONPATH=src python benchmarks/hizoo_hessian.py"
                          f" --steps {args.steps} --lr {args.lr:g} --hessian-smooth {alpha:g}")  # fmt: skip
        runs[f"{alpha:g}"] = row
        machine = {"python": platform.python_version(), "cpus": os.cpu_count(), "torch": torch.__version__,
                   "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}  # fmt: skip
        out = {"machine": machine, "runs": runs}
        atomic_write_json(OUT, out)  # after each run: an interrupted sweep keeps what it measured
        spread = row["D"]
        print(f"a = {alpha:g}; |h_t| median {row['abs_h']['median']:.4g} (max {row['abs_h']['max']:.4g}); "
              f"a|h_t| median {row['alpha_abs_h']['median']:.3g}, summed {row['alpha_abs_h']['sum']:.3g}; "
              f"D mean {spread['mean']:.6g}, min {spread['min']:.6g}, max {spread['max']:.6g}, "
              f"std of log D {spread['log_std']:.3g}; best dev {row['best_dev']} (step {row['best_step']}), "
              f"test {row['test_at_best_dev']}", flush=True)  # fmt: skip
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
