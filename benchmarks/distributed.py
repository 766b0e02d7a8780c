"""Distributed benchmarks (2-core CPU, no GPU, gloo).

    python benchmarks/distributed.py lab [--scale full]  # Local SGD vs SGD, QSR vs constant H (K=8 simulated)
    python benchmarks/distributed.py comm                # torchrun: DDP vs Local SGD (H=16) vs DP-ZO
    python benchmarks/distributed.py tables              # the markdown tables of docs/distributed.md

``lab`` writes benchmarks/results/distributed_localsgd/{results.json,config.json,localsgd.png} and copies the
plot to docs/img/distributed_localsgd.png. ``comm`` launches ``torchrun --standalone --nproc_per_node N`` on
this file's ``worker`` mode for N in {1, 2} and writes benchmarks/results/distributed_comm.json. Every process
uses one thread (torch.set_num_threads(1)), so 2 processes use the 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from hdopt.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LAB_DIR = RESULTS / "distributed_localsgd"
COMM_JSON = RESULTS / "distributed_comm.json"
IMG = ROOT / "docs" / "img"

# comm benchmark problem: an MLP on random data (wall-clock and bytes, not accuracy)
DIMS = (784, 512, 512, 10)
GLOBAL_BATCH = 256
ZO_BATCHES = (256, 2048)  # ZO also at a large batch, where the forward passes dominate the step
STEPS = int(os.environ.get("HDOPT_BENCH_STEPS", "64"))  # timed steps per method (a multiple of H = 16)
WARMUP = 16  # warm-up + timed steps = whole Local SGD rounds, so bytes/step = parameters / 16


# -- lab ---------------------------------------------------------------------------------------------------
def lab(scale: str) -> None:
    from hdopt.dynamics.experiments.localsgd import EXPERIMENT

    torch.set_num_threads(1)
    config = EXPERIMENT.config(scale)
    result = EXPERIMENT.run(config, LAB_DIR)
    IMG.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.plot, IMG / "distributed_localsgd.png")
    print(result.verdict())
    print(f"{result.runtime_s:.0f} s; results in {LAB_DIR}")


# -- comm (driver) -----------------------------------------------------------------------------------------
def comm() -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    rows = []
    for nproc in (1, 2):
        out = RESULTS / f".distributed_comm_{nproc}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               __file__, "worker", str(out)]
        print("$", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, env=env, check=True, timeout=1800)
        rows += json.loads(out.read_text())
        out.unlink()
    payload = {"hardware": "2-core CPU, no GPU (gloo, 1 thread per process), shared with other jobs",
               "model": f"MLP {'-'.join(map(str, DIMS))}", "global_batch": GLOBAL_BATCH,
               "torch": torch.__version__, "rows": rows, "zo_scaling": zo_scaling(rows)}
    atomic_write_json(COMM_JSON, payload)
    print(comm_table(payload))


def zo_scaling(rows: list[dict]) -> dict:
    """Strong scaling of DP-ZO: the global batch fixed, 1 vs 2 processes."""
    out = {}
    for size in ZO_BATCHES:
        zo = {r["world_size"]: r for r in rows if r["method"] == "data-parallel ZO" and r["batch"] == size}
        if 1 in zo and 2 in zo:
            speedup = zo[1]["mean_step_s"] / zo[2]["mean_step_s"]
            out[str(size)] = {"step_s_1": zo[1]["mean_step_s"], "step_s_2": zo[2]["mean_step_s"],
                              "speedup": speedup, "efficiency": speedup / 2,
                              "cpu_efficiency": zo[1]["cpu_s_per_step"] / zo[2]["cpu_s_per_step"]}
    return out


# -- comm (worker, under torchrun) --------------------------------------------------------------------------
def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(DIMS[:-1], DIMS[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(DIMS) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def batch(step: int, rank: int, world: int, size: int = GLOBAL_BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    from hdopt.distributed import shard_batch

    g = torch.Generator().manual_seed(step)
    x = torch.randn(size, DIMS[0], generator=g)
    y = torch.randint(0, DIMS[-1], (size,), generator=g)
    return shard_batch((x, y), rank, world)


def timed(step_fn, steps: int, comm) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU seconds (this process, all its threads) of each step after the warm-up."""
    times, cpu = [], []
    for t in range(WARMUP + steps):
        comm.barrier("benchmark barrier")
        start, start_cpu = time.perf_counter(), time.process_time()
        step_fn(t)
        if t >= WARMUP:
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return times, cpu


def run_ddp(comm) -> dict:
    model = mlp()
    ddp = nn.parallel.DistributedDataParallel(model) if comm.active else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(t):
        x, y = batch(t, comm.rank, comm.world_size)
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()

    times, cpu = timed(step, STEPS, comm)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"method": "DDP (torch)", "times": times, "cpu": cpu,
            "bytes_per_step": params if comm.active else 0}


def run_local_sgd(comm) -> dict:
    from hdopt.distributed import LocalSGD, LocalSGDConfig

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sgd = LocalSGD(model, opt, LocalSGDConfig(period=16), comm)

    def step(t):
        x, y = batch(t, comm.rank, comm.world_size)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        sgd.step()

    times, cpu = timed(step, STEPS, comm)
    per_step = sgd.bytes_communicated / sgd.step_count if comm.active else 0
    return {"method": "Local SGD (H=16)", "times": times, "cpu": cpu, "bytes_per_step": per_step}


def run_zo(comm, size: int) -> dict:
    from hdopt.distributed import data_parallel_zo
    from hdopt.zo import ZOSGD

    model = mlp()
    opt = data_parallel_zo(ZOSGD, model.named_parameters(), comm, model=model, lr=1e-4, eps=1e-3, q=1,
                           noise="rademacher", seed=0)  # fmt: skip

    def step(t):
        x, y = batch(t, comm.rank, comm.world_size, size)
        with torch.no_grad():
            opt.step(lambda: F.cross_entropy(model(x), y))

    times, cpu = timed(step, STEPS, comm)
    per_step = opt.reduce.bytes / max(1, opt.reduce.steps) if comm.active else 0
    return {"method": "data-parallel ZO", "times": times, "cpu": cpu, "bytes_per_step": per_step,
            "batch": size}


def worker(out: Path) -> None:
    from hdopt.distributed import exit_on_rank_failure, init_from_env

    torch.set_num_threads(1)
    comm = init_from_env(timeout_s=300)
    rows = []
    with exit_on_rank_failure():
        runs = [run_ddp, run_local_sgd] + [lambda c, b=b: run_zo(c, b) for b in ZO_BATCHES]
        for fn in runs:
            r = {"batch": GLOBAL_BATCH} | fn(comm)
            times, cpu = r.pop("times"), r.pop("cpu")
            med = comm.mean(statistics.median(times), "median step time")  # mean over ranks
            mean = comm.mean(statistics.fmean(times), "mean step time")
            cpu_total = comm.mean(statistics.fmean(cpu), "cpu time") * comm.world_size  # all ranks
            rows.append(r | {"world_size": comm.world_size, "median_step_s": med, "mean_step_s": mean,
                             "cpu_s_per_step": cpu_total, "examples_per_s": r["batch"] / mean,
                             "steps": len(times)})
    if comm.rank == 0:
        out.write_text(json.dumps(rows, indent=2))


# -- tables ------------------------------------------------------------------------------------------------
def comm_table(payload: dict) -> str:
    lines = ["| method | global batch | processes | payload per step per worker | mean step | median step "
             "| CPU s/step (all ranks) | examples/s |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(payload["rows"], key=lambda r: (r["method"], r["batch"], r["world_size"])):
        lines.append(f"| {r['method']} | {r['batch']} | {r['world_size']} | "
                     f"{fmt_bytes(r['bytes_per_step'])} | "
                     f"{1000 * r['mean_step_s']:.1f} ms | {1000 * r['median_step_s']:.1f} ms | "
                     f"{1000 * r.get('cpu_s_per_step', float('nan')):.1f} ms | {r['examples_per_s']:.0f} |")
    for size, s in payload.get("zo_scaling", {}).items():
        lines.append(f"\nDP-ZO strong scaling, global batch {size}: {1000 * s['step_s_1']:.1f} ms -> "
                     f"{1000 * s['step_s_2']:.1f} ms per step, speedup {s['speedup']:.2f}, "
                     f"efficiency {100 * s['efficiency']:.0f}% at 2 processes; CPU-time efficiency "
                     f"{100 * s.get('cpu_efficiency', float('nan')):.0f}%")
    return "\n".join(lines)


def lab_table(results: dict) -> str:
    lines = ["| run | lr | syncs | payload/step/worker | Hessian trace | sharpness | train loss | test acc |",
             "|---|---|---|---|---|---|---|---|"]
    cfg = results["config"]
    for label, log in results["curves"].items():
        f = log["final"]
        lr = f"cosine {cfg['cosine_lr']}" if label.startswith("cosine") else str(cfg["lr"])
        lines.append(f"| {label} | {lr} | {log['syncs']} | {fmt_bytes(log['bytes_per_step'])} | "
                     f"{f['trace']:.2f} +- {f['trace_err']:.2f} | {f['sharpness']:.3f} | "
                     f"{f['train_loss']:.4f} | {100 * f['test_acc']:.2f}% |")
    lines.append(f"\nverdict: {results['verdict']}  ({results['runtime_s']:.0f} s)")
    return "\n".join(lines)


def fmt_bytes(n: float) -> str:
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def tables() -> None:
    if (LAB_DIR / "results.json").exists():
        print(lab_table(json.loads((LAB_DIR / "results.json").read_text())))
    if COMM_JSON.exists():
        print()
        print(comm_table(json.loads(COMM_JSON.read_text())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    p = sub.add_parser("lab")
    p.add_argument("--scale", default="full", choices=("smoke", "default", "full"))
    sub.add_parser("comm")
    sub.add_parser("tables")
    w = sub.add_parser("worker")
    w.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.part == "lab":
        lab(args.scale)
    elif args.part == "comm":
        comm()
    elif args.part == "worker":
        worker(args.out)
    else:
        tables()


if __name__ == "__main__":
    main()
