"""Lanczos vs power iteration for sharpness: Hessian-vector products (HVPs) needed for 1% accuracy.

Problems: (1) a 500 x 500 symmetric matrix with top eigenvalues 10, 9.5, 9 (a small gap, the hard case
for power iteration); (2) the tanh MLP of ``hdopt lab eos`` on 1,000 digits at initialization; (3) the same
net after 600 full-batch GD steps at lr 0.4 (at the edge of stability, sharpness ~ 2/eta = 5). The reference
top eigenvalue is Lanczos with 150 HVPs (for the matrix: the exact value). For each of ``--starts`` random
start vectors we count the HVPs after which the estimate stays within 1% of the reference.

    PYTHONPATH=src python benchmarks/dynamics.py            # prints a table, writes
                                                            # benchmarks/results/dynamics_lanczos.json
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import numpy as np
import torch

from hdopt.dynamics.data import load_digits
from hdopt.dynamics.experiments.eos import half_mse
from hdopt.dynamics.hessian import HessianOperator, lanczos, power_iteration
from hdopt.dynamics.models import tanh_mlp
from hdopt.io import atomic_write_json


def hvps_to_accuracy(history: list[float], reference: float, rel: float) -> int | None:
    """Number of HVPs after which every later estimate is within ``rel`` of ``reference`` (None: never)."""
    ok = np.abs(np.asarray(history) - reference) <= rel * abs(reference)
    if not ok[-1]:
        return None
    bad = np.nonzero(~ok)[0]
    return int(bad[-1]) + 2 if len(bad) else 1


def known_matrix(dim: int = 500) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    eigs = torch.cat([torch.tensor([10.0, 9.5, 9.0], dtype=torch.float64),
                      torch.linspace(-2.0, 8.0, dim - 3, dtype=torch.float64)])
    A = q @ torch.diag(eigs) @ q.T
    return (lambda v: A @ v), dim


def mlp_operator(trained: bool) -> tuple[HessianOperator, int]:
    data = load_digits(n_train=1000)
    x, y = data.train_x, torch.nn.functional.one_hot(data.train_y, 10).float()
    model = tanh_mlp(64, 64, 10, 2, generator=torch.Generator().manual_seed(0))
    if trained:
        opt = torch.optim.SGD(model.parameters(), lr=0.4)
        for _ in range(600):
            opt.zero_grad()
            half_mse(model(x), y).backward()
            opt.step()
    op = HessianOperator(model, half_mse, (x, y))
    return op, op.dim


def compare(name: str, matvec, dim: int, reference: float | None, starts: int, budget: int,
            rel: float) -> dict:
    """Run both methods from ``starts`` start vectors; count HVPs to ``rel`` accuracy."""
    if reference is None:
        reference = lanczos(matvec, dim, 1, 150, torch.Generator().manual_seed(12345)).eigenvalues[0]
    rows = {"lanczos": [], "power": []}
    seconds = {"lanczos": 0.0, "power": 0.0}
    for s in range(starts):
        for method, fn in (("lanczos", lanczos), ("power", power_iteration)):
            t0 = time.perf_counter()
            result = fn(matvec, dim, iters=budget, generator=torch.Generator().manual_seed(s))
            seconds[method] += time.perf_counter() - t0
            rows[method].append(hvps_to_accuracy(result.history, reference, rel))
    summary = {"problem": name, "dim": dim, "reference_top_eigenvalue": reference, "budget_hvps": budget}
    for method, counts in rows.items():
        done = [c for c in counts if c is not None]
        summary[method] = {
            "hvps_per_start": counts,
            "median_hvps": float(np.median(done)) if done else None,
            "max_hvps": max(done) if done else None,
            "failed_within_budget": len(counts) - len(done),
            "seconds_per_run": seconds[method] / starts,
        }
    return summary


def _fmt(m: dict) -> str:
    return f"{m['median_hvps']:.0f} / {m['max_hvps']}" if m["median_hvps"] is not None else "never"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--starts", type=int, default=10, help="random start vectors per problem")
    parser.add_argument("--budget", type=int, default=300, help="most HVPs per run")
    parser.add_argument("--rel", type=float, default=0.01, help="target relative accuracy")
    parser.add_argument("--out", default="benchmarks/results/dynamics_lanczos.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    problems = [("matrix 500x500, top eigenvalues 10, 9.5, 9", *known_matrix(), 10.0)]  # exact reference
    for trained in (False, True):
        op, dim = mlp_operator(trained)
        stage = "after 600 GD steps (EoS)" if trained else "init"
        problems.append((f"tanh MLP 64-64-64-10, digits, {stage}", op, dim, None))
    results = [compare(name, mv, dim, ref, args.starts, args.budget, args.rel)
               for name, mv, dim, ref in problems]
    print(f"HVPs until the top-eigenvalue estimate stays within {args.rel:.0%} "
          f"(median / max over {args.starts} start vectors)")
    print(f"{'problem':60s} {'lambda_max':>10s} {'Lanczos':>12s} {'power':>12s}")
    for r in results:
        lz, pw = r["lanczos"], r["power"]
        fail = f" ({pw['failed_within_budget']} > {args.budget})" if pw["failed_within_budget"] else ""
        print(f"{r['problem']:60s} {r['reference_top_eigenvalue']:10.4f} {_fmt(lz):>12s} "
              f"{_fmt(pw) + fail:>12s}")
    payload = {"rel_accuracy": args.rel, "starts": args.starts, "results": results,
               "hardware": f"2-core CPU ({platform.machine()}), no GPU, torch {torch.__version__}, 1 thread",
               "seconds_total": round(time.perf_counter() - t0, 1),
               "command": "PYTHONPATH=src python benchmarks/dynamics.py"}
    atomic_write_json(args.out, payload)
    print(f"wrote {args.out} in {payload['seconds_total']} s")


if __name__ == "__main__":
    main()
