"""Forward-pass and CPU-time budgets of forward-only fine-tuning: MeZO, its successors, top-block ZO, and FT.

    HDOPT_BENCH_THREADS=1 python benchmarks/zo_convergence.py run --jobs 2                     # SST-2's grids
    HDOPT_BENCH_THREADS=1 python benchmarks/zo_convergence.py run --finals --jobs 2            # their seeds
    HDOPT_BENCH_THREADS=1 python benchmarks/zo_convergence.py run --dense --jobs 2             # dense starts
    HDOPT_BENCH_THREADS=1 python benchmarks/zo_convergence.py run --plan mr --jobs 2           # MR's grids
    HDOPT_BENCH_THREADS=1 python benchmarks/zo_convergence.py run --plan mr --finals --jobs 2  # their seeds
    HDOPT_BENCH_THREADS=2 python benchmarks/zo_convergence.py run --only read-exact-lr0.001 \
        read-exact-lr0.003 read-exact-lr0.01 --jobs 1     # the exact read-path grid, both cores a run
    HDOPT_BENCH_THREADS=2 python benchmarks/zo_convergence.py run --plan mr --only mr-read-exact-lr0.001 \
        mr-read-exact-lr0.003 mr-read-exact-lr0.01 mr-read-exact-lr0.03 --jobs 1  # the same on MR
    python benchmarks/zo_convergence.py report                                 # one table, plots, JSON

Every run is ``hdopt finetune`` on the setup of docs/finetune.md's SST-2 runs (SmolLM2-135M, 1000 train /
100 dev / 200 test examples, 64 tokens, data seed 0), from the prompt (no --lp-init), in a fresh process with
``HDOPT_BENCH_THREADS`` torch threads (default 2), ``--jobs`` of them at a time. Its folder goes under
``benchmarks/results/zo_convergence/NAME`` with ``timing.json``: the wall-clock seconds from the start of the
process (imports and model loading included) to the end of every step (the step's dev evaluation included)
and to the end of the run (the test evaluation included). A run whose timing.json exists is not run again.

A plan is a task's runs. SST-2's lists the grids (one learning rate per run) and the long top-block runs; the
second task's (MR) has FT and the grids of MeZO and the four successors, each on all weights and on the top
block, with SST-2's budgets. Both have node perturbation's grids on the last block's readout maps (``--method
node-perturbation``) and on read-position adapters (``--method read-adapters``), and the grid of the read
adapters' exact gradient from forward passes (``--method read-adapters-exact``; both cores a run). The finals
of a plan are each grid's choice with seeds 1 and 2, chosen from the grids' results (the exact read-path
gradient's with ``HDOPT_BENCH_THREADS=2 ... run --finals --only NAMES --jobs 1``); the dense starts rerun the
first forwards of the chosen whole-model runs with frequent dev evaluations (see DENSE_EVERY). ``report``
reads whatever runs exist and writes ``benchmarks/results/zo_convergence.{json,md}`` (one table, a row per
task and method) and per task ``docs/img/zo_convergence[_TASK]_{forwards,minutes}.png``: dev accuracy against
forward passes (a forward through K of L blocks counts K/L; the bottom's cache counts too) and against
minutes, and per method the best dev accuracy, the test accuracy at the best-dev step, and the forward passes
and minutes it took to reach the task's tuned MeZO's final dev accuracy (on SST-2, also the 1000-step earlier
MeZO run's).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from hdopt.finetune.budget_goals import SUCCESSORS, accuracy_goal, forward_goal
from hdopt.io import atomic_write_json, atomic_write_text, save_figure
from hdopt.plotting import pyplot

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RUNS = RESULTS / "zo_convergence"
THREADS = os.environ.get("HDOPT_BENCH_THREADS", "2")
DATA_DIR = os.environ.get("HDOPT_DATA_DIR", str(ROOT.parent / "shared" / "data"))
PROTOCOL = {"model": "smollm2-135m", "num_train": 1000, "num_dev": 100, "num_eval": 200, "max_length": 64,
            "data_seed": 0, "batch_size": 16}  # fmt: skip


def _run(name: str, group: str, label: str, task: str = "sst2", seed: int = 0, **flags) -> dict:
    """One planned run: ``group`` is the method row it belongs to, ``label`` its line in the plots."""
    return {"name": name, "group": group, "label": label, "task": task, "seed": seed, "flags": flags}


def _grid(prefix: str, group: str, lrs, task: str = "sst2", **flags) -> list[dict]:
    return [_run(f"{prefix}-lr{lr:g}", group, f"{group} lr {lr:g}", task, lr=lr, **flags) for lr in lrs]


# -- the plan ------------------------------------------------------------------------------------------------
# The whole-model MeZO grid gets FORWARDS forward passes per run (about 20 CPU-minutes at one thread on the
# shared machine); the top-block grids (K = 1 of SmolLM2's 30 blocks; a block forward counts 1/30) get
# TOP_FORWARDS for MeZO (3000 steps) and SUCCESSOR_FORWARDS for the successors (FZOO: N + 1 = 9 block
# forwards a step, HiZOO 3, LOZO and Sparse-MeZO 2), all evaluated on dev every EVAL_FORWARDS. On SST-2 every
# grid began with three learning rates and was extended, one at a time on its own spacing, past each edge its
# choice fell on, until the choice was inside the grid. The long runs take top-block MeZO to the paper's 20k
# steps at lr 3e-4 (the best of an earlier sweep, 1e-4 / 3e-4 / 1e-3: dev 71 / 77 / - after 3000 steps) and
# top-block FZOO, the best top-block successor, to FZOO_LONG_STEPS (about MeZO's 20k steps' forward passes) at
# its grid's choice decayed linearly to zero (a normalized step has a fixed length: a constant lr does not
# settle); the finals (``run --finals``) rerun the chosen settings with seeds 1 and 2.
FORWARDS = 200
TOP_FORWARDS = 200
SUCCESSOR_FORWARDS = 100
EVAL_FORWARDS = 50 / 3  # 250 top-block MeZO steps
BLOCK = 1 / 30
ZO = dict(method="mezo", schedule="constant")
TOP = dict(ZO, zo_blocks=1)
LONG_STEPS = 20000
FZOO_LONG_STEPS = 4000
# Node perturbation on the last block's readout maps (hdopt finetune --method node-perturbation): N = 8
# directions, central (17 copies of the read positions a step: 17/30 of a forward), 2000 steps (1133
# forwards, less than the 20k-step top-block MeZO run's 1400), dev every 100 steps; AdamW, lr grid around its
# first default, 1e-3 (its choice, 3e-4, is the default now), added after every other grid had run, and
# extended past an edge as the others were (SST-2: 3e-4 and 3e-3 tied at best dev 85, 3e-4 earlier; MR: 3e-4
# best, 81; so 1e-4 was added on both).
NP = dict(method="node-perturbation", zo_blocks=1, schedule="constant", q=8, eps=1e-2, steps=2000,
          eval_every=100)  # fmt: skip
NP_LRS = (1e-4, 3e-4, 1e-3, 3e-3)
NP_GROUP = "Node perturbation, last block"
# Node perturbation of read-position adapters (hdopt finetune --method read-adapters): a rank-8 bottleneck in
# every block at the prompt's last token, the context's keys and values cached; N = 16 one-sided directions
# (17 copies of one token a row a step: 17/T of a forward, T the rows' mean length), 800 steps, dev every 50;
# AdamW, lr grid around the method's default. Added 2026-12-07, after node perturbation's grids.
RA = dict(method="read-adapters", read_rank=8, estimator="one-sided", q=16, eps=1e-2, schedule="constant",
          steps=800, eval_every=50)  # fmt: skip
RA_LRS = (3e-4, 1e-3, 3e-3)
RA_GROUP = "Node perturbation, read-position adapters"
# The same adapters on their exact gradient from forward passes (hdopt finetune --method read-adapters-exact:
# forward differences along each of the L x r = 240 bottleneck coordinates, 125 copies of the last tokens'
# path a step: 125/T of a forward), batch 8, 400 steps, dev every 50, AdamW on the lr grid of backprop's
# read-path ceiling (benchmarks/read_adapters_ceiling.py, whose chosen lr is the middle one). Fixed before
# any of its runs; added 2026-12-07, after the read-adapters grids. A step costs about 7x node
# perturbation's (125 against 17 copies of the whole path, on half the rows), so these runs use both cores
# (HDOPT_BENCH_THREADS=2, --jobs 1): their minutes are the 2-core CPU's, the other rows' one core's (the
# table says so).
RX = dict(method="read-adapters-exact", schedule="constant", steps=400, eval_every=50, batch_size=8)
RX_LRS = (1e-3, 3e-3, 1e-2)
RX_GROUP = "Exact read-path gradient (forward differences), read-position adapters"


def _top_grid(prefix: str, group: str, optimizer: str, lrs, per_step: int, budget: float = SUCCESSOR_FORWARDS,
              task: str = "sst2", **flags) -> list[dict]:  # fmt: skip
    per_step_forwards = per_step * BLOCK
    return _grid(prefix, group, lrs, task, optimizer=optimizer, steps=round(budget / per_step_forwards),
                 eval_every=round(EVAL_FORWARDS / per_step_forwards), **TOP, **flags)  # fmt: skip


def _whole_grid(prefix: str, group: str, optimizer: str, lrs, per_step: int,
                task: str = "sst2") -> list[dict]:  # fmt: skip
    """A successor on all weights with whole-model MeZO's budget (FORWARDS), evaluated every 50 forwards."""
    return _grid(prefix, group, lrs, task, optimizer=optimizer, steps=FORWARDS // per_step,
                 eval_every=max(1, round(50 / per_step)), **ZO)  # fmt: skip


def _second_task(task: str) -> list[dict]:
    """The second task's plan, fixed before any of its runs: FT (as docs/finetune.md's SST-2 FT run), the
    whole-model MeZO grid, top-block MeZO's grid and the grid of SST-2's best top-block successor (LOZO), with
    SST-2's grids and budgets. MeZO's choice fell on its grid's top edge (3e-5), so its grid was extended past
    it one learning rate at a time on its spacing (1e-4, then 3e-4), as SST-2's grids were. Added later: the
    other top-block successors (FZOO, SST-2's best top-block successor once SST-2's grids were extended, then
    HiZOO and Sparse-MeZO), each on the three learning rates of its SST-2 grid around SST-2's choice, and last
    the four successors on all weights, chosen the same way; the whole-model LOZO, FZOO and Sparse-MeZO grids
    were extended past the edge their choices fell on (LOZO: 3e-6; FZOO: 5.12e-2, its choice 1.28e-2 tying
    3.2e-3's best dev at an earlier step; Sparse-MeZO: 3e-5). Then node perturbation's grids (NP_LRS,
    RA_LRS), and last the exact read-path gradient's (RX_LRS, added 2026-12-07 after its SST-2 runs), as on
    SST-2; its choice fell on the top edge (1e-2), so 3e-2 was added."""
    return [
        _run(f"{task}-ft", "FT (AdamW, whole model)", "FT", task, method="ft", optimizer="adamw", lr=1e-5,
             schedule="linear", steps=250, batch_size=8, eval_every=50),
        *_grid(f"{task}-mezo", "MeZO", (3e-6, 1e-5, 3e-5, 1e-4, 3e-4), task, optimizer="zosgd", eps=1e-3,
               steps=FORWARDS // 2, eval_every=25, **ZO),
        *_top_grid(f"{task}-top1-mezo", "MeZO, top block", "zosgd", (1e-4, 3e-4, 1e-3), 2, TOP_FORWARDS, task,
                   eps=1e-3),
        *_top_grid(f"{task}-top1-lozo", "LOZO, top block", "lozo", (1e-4, 3e-4, 1e-3), 2, task=task),
        *_top_grid(f"{task}-top1-fzoo", "FZOO, top block", "fzoo", (8e-3, 3.2e-2, 0.128), 9, task=task),
        *_top_grid(f"{task}-top1-hizoo", "HiZOO, top block", "hizoo", (3e-4, 1e-3, 3e-3), 3, task=task),
        *_top_grid(f"{task}-top1-sparse", "Sparse-MeZO, top block", "sparse-mezo", (1e-4, 3e-4, 1e-3), 2,
                   task=task),
        *_whole_grid(f"{task}-lozo", "LOZO", "lozo", (3e-6, 1e-5, 3e-5, 1e-4), 2, task=task),
        *_whole_grid(f"{task}-fzoo", "FZOO", "fzoo", (8e-4, 3.2e-3, 1.28e-2, 5.12e-2), 9, task=task),
        *_whole_grid(f"{task}-hizoo", "HiZOO", "hizoo", (3e-5, 1e-4, 3e-4), 3, task=task),
        *_whole_grid(f"{task}-sparse", "Sparse-MeZO", "sparse-mezo", (3e-5, 1e-4, 3e-4, 1e-3), 2, task=task),
        *_grid(f"{task}-top1-np", NP_GROUP, NP_LRS, task, **NP),
        *_grid(f"{task}-read-np", RA_GROUP, RA_LRS, task, **RA),
        *_grid(f"{task}-read-exact", RX_GROUP, (*RX_LRS, 3e-2), task, **RX),
    ]


PLANS: dict[str, list[dict]] = {
    "sst2": [
        *_grid("mezo", "MeZO", (3e-6, 1e-5, 3e-5, 1e-4, 3e-4), optimizer="zosgd", eps=1e-3,
               steps=FORWARDS // 2, eval_every=25, **ZO),
        *_top_grid("top1-mezo", "MeZO, top block", "zosgd", (1e-4, 3e-4, 1e-3), 2, TOP_FORWARDS, eps=1e-3),
        _run("top1-mezo-long", f"MeZO, top block, {LONG_STEPS // 1000}k steps", f"{LONG_STEPS} steps",
             optimizer="zosgd", eps=1e-3, lr=3e-4, steps=LONG_STEPS, eval_every=1000, **TOP),
        _run("top1-fzoo-long", f"FZOO, top block, {FZOO_LONG_STEPS} steps", f"{FZOO_LONG_STEPS} steps",
             optimizer="fzoo", lr=3.2e-2, steps=FZOO_LONG_STEPS, eval_every=250,
             **dict(TOP, schedule="linear")),
        *_top_grid("top1-fzoo", "FZOO, top block", "fzoo", (1e-4, 5e-4, 2e-3, 8e-3, 3.2e-2, 0.128), 9),
        *_top_grid("top1-hizoo", "HiZOO, top block", "hizoo", (1e-4, 3e-4, 1e-3, 3e-3), 3),
        *_top_grid("top1-lozo", "LOZO, top block", "lozo", (3e-5, 1e-4, 3e-4, 1e-3), 2),
        *_top_grid("top1-sparse", "Sparse-MeZO, top block", "sparse-mezo", (1e-4, 3e-4, 1e-3, 3e-3), 2),
        # The successors on all weights, their grids a tenth of their top-block grids, as whole-model MeZO's
        # is of top-block MeZO's (LOZO: MeZO's grid; FZOO: around its paper's 5e-5).
        *_whole_grid("lozo", "LOZO", "lozo", (3e-6, 1e-5, 3e-5, 1e-4), 2),
        *_whole_grid("fzoo", "FZOO", "fzoo", (5e-5, 2e-4, 8e-4, 3.2e-3, 1.28e-2), 9),
        *_whole_grid("hizoo", "HiZOO", "hizoo", (1e-5, 3e-5, 1e-4, 3e-4), 3),
        *_whole_grid("sparse", "Sparse-MeZO", "sparse-mezo", (3e-5, 1e-4, 3e-4, 1e-3), 2),
        *_grid("top1-np", NP_GROUP, NP_LRS, **NP),
        *_grid("read-np", RA_GROUP, RA_LRS, **RA),
        *_grid("read-exact", RX_GROUP, RX_LRS, **RX),
    ],
    "mr": _second_task("mr"),
}
# The forward-only methods (hdopt finetune --method) whose grid choices get the other seeds.
FORWARD_ONLY = ("mezo", "node-perturbation", "read-adapters", "read-adapters-exact")
# The accuracy goal (forward-only >= 87 test within 30 minutes) is SST-2's (FT: 89.5); the forward-pass goal
# is decided on every task.
ACCURACY_GOAL_TASKS = ("sst2",)
# The final runs: every grid's chosen setting (each ZO row of the table, whole-model and top-block; not the
# long runs, which are single runs, nor FT) with these seeds.
FINAL_SEEDS = (1, 2)
# Dense starts (``run --dense``): the forward-pass goal asks for a third of MeZO's forwards to its final dev
# accuracy (on the grids' evaluations 100 on SST-2 and 50 on MR, so 33 and 17), finer than those evaluations
# (every 50 forwards). The chosen whole-model runs (MeZO and each successor) are rerun over their first
# forwards with dev evaluated about every DENSE_EVERY forwards: MeZO over DENSE_MEZO_FORWARDS (up to where its
# SST-2 grid run first reached its final dev), the successors over DENSE_SUCCESSOR_FORWARDS (past a third of
# that). Same seed and constant lr, so the weights at a step are the grid run's (the report checks the dev
# accuracies they share); their points join the chosen run's curve, timed by its per-step clock. Top-block
# runs get none: their cache alone costs about 60 forwards, more than the third.
DENSE_TASKS = ("sst2", "mr")
DENSE_EVERY = 6
DENSE_MEZO_FORWARDS = 100
DENSE_SUCCESSOR_FORWARDS = 36
# Rows read from earlier runs docs/finetune.md reports (not rerun): FT (AdamW, 250 steps), and the longest
# whole-model MeZO run (1000 steps at lr 1e-5, Rademacher, linear decay), whose final dev accuracy is a second
# target.
EARLIER = {"sst2": {
    "ft": (RESULTS / "finetune_runs" / "sst2-ft-250", "FT (AdamW, whole model; earlier run)"),
    "mezo-1000": (RESULTS / "finetune_runs" / "sst2-mezo-linear-1000",
                  "MeZO, 1000 steps (earlier run: lr 1e-5, Rademacher, linear decay)")}}  # fmt: skip


# -- running -------------------------------------------------------------------------------------------------
def _flags(run: dict) -> list[str]:
    values = {**PROTOCOL, **run["flags"], "task": run["task"], "seed": run["seed"],
              "output_dir": str(RUNS / run["name"]), "data_dir": DATA_DIR, "progress": False}  # fmt: skip
    out = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            out += [flag, str(value)]
    return out


def _long(run: dict) -> bool:
    """A long run (a group of its own, not a grid's choice)."""
    return run["name"].endswith("-long")


def _on_top(run: dict) -> bool:
    """A top-block run."""
    return "zo_blocks" in run["flags"]


def finals(plan: str, chosen: dict[str, dict] | None = None) -> list[dict]:
    """The final runs: every grid choice's seed runs (``chosen``: :func:`choose` of the plan's read runs; a
    grid without results has no choice yet)."""
    chosen = choose(_read_all(PLANS[plan])) if chosen is None else chosen
    return [r for pick in chosen.values() if _final(pick) for r in seed_runs(pick)]


def _final(pick: dict) -> bool:
    """A chosen setting that gets the other seeds: a forward-only grid's choice (``--method mezo``, whatever
    the ZO optimizer, node perturbation of either kind, or the read adapters' exact gradient; not a long
    run, not FT)."""
    return pick["flags"].get("method") in FORWARD_ONLY and not _long(pick)


def seed_runs(pick: dict) -> list[dict]:
    """The runs of a chosen setting with the other seeds (FINAL_SEEDS)."""
    prefix = pick["name"].rsplit("-lr", 1)[0] + f"-lr{pick['flags']['lr']:g}"
    return [_run(f"{prefix}-seed{s}", pick["group"], f"{pick['group']} seed {s}", pick["task"], seed=s,
                 **pick["flags"]) for s in FINAL_SEEDS]  # fmt: skip


def dense(plan: str, chosen: dict[str, dict] | None = None) -> list[dict]:
    """The dense-start reruns of the chosen whole-model runs (see DENSE_EVERY), from the grids' choices."""
    if plan not in DENSE_TASKS:
        return []
    chosen = choose(_read_all(PLANS[plan])) if chosen is None else chosen
    out = []
    for group, pick in chosen.items():
        flags = pick["flags"]
        if _on_top(pick) or _long(pick) or (group != "MeZO" and flags.get("optimizer") not in SUCCESSORS):
            continue
        res = pick["results"]
        per_step = res["forwards"] / res["steps"]
        budget = DENSE_MEZO_FORWARDS if group == "MeZO" else DENSE_SUCCESSOR_FORWARDS
        steps = max(1, round(budget / per_step))
        every = max(1, round(DENSE_EVERY / per_step))
        out.append(_run(f"{pick['name']}-dense", group, f"{group} dense start", pick["task"],
                        seed=pick["seed"], **{**flags, "steps": steps, "eval_every": every}))  # fmt: skip
    return out


def with_dense(run: dict, dense_run: dict | None) -> dict:
    """``run`` with the dense rerun's dev points joined to its curve (forwards as counted, minutes from the
    run's own per-step clock); an error if the two disagree at a step both evaluated (other weights)."""
    if dense_run is None:
        return run
    mine = {point[3]: point for point in run["curve"]}
    joined = dict(mine)
    for forwards, _, dev, step in dense_run["curve"]:
        if step in mine and mine[step][2] != dev:
            raise ValueError(f"{dense_run['name']}: dev {dev} at step {step}, but {run['name']} had "
                             f"{mine[step][2]}; the dense start is not the same run")  # fmt: skip
        if step not in mine and step in run["marks"]:
            joined[step] = (forwards, run["marks"][step] / 60, dev, step)
    return {**run, "curve": [joined[step] for step in sorted(joined)]}


def planned(plan: str) -> list[dict]:
    chosen = choose(_read_all(PLANS[plan]))  # the grids read once for both
    return PLANS[plan] + finals(plan, chosen) + dense(plan, chosen)


def run_one(plan: str, name: str) -> None:
    """(In the child process.) Run the planned run ``name`` and write its timing.json."""
    start = time.perf_counter()
    from hdopt.finetune.cli import config_overrides, configure
    from hdopt.finetune.config import RunConfig
    from hdopt.finetune.errors import DivergenceError
    from hdopt.finetune.trainer import finetune

    run = next(r for r in planned(plan) if r["name"] == name)
    marks: dict[int, float] = {}
    parser = argparse.ArgumentParser()
    configure(parser)
    cfg = RunConfig().replace(**config_overrides(parser.parse_args(_flags(run))))

    def mark(step: int) -> None:
        marks[step] = time.perf_counter() - start

    try:
        results, folder = finetune(cfg, on_step=mark)
    except DivergenceError as error:  # a finished run too: results.json says "diverged", the dev curve stands
        results, folder = {"status": "diverged", "error": str(error)}, cfg.train.output_dir
    timing = {"steps": marks, "total": time.perf_counter() - start, "threads": THREADS, "env": _env()}
    atomic_write_json(Path(folder) / "timing.json", timing)
    print(json.dumps({"name": name, "test": results.get("test"), "status": results.get("status"),
                      "seconds": round(timing["total"], 1)}))  # fmt: skip


def _env() -> dict:
    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}  # fmt: skip


def run(args) -> None:
    """The missing runs of the grids (or, with ``--finals``/``--dense``, of the finals or the dense starts),
    ``--jobs`` at a time."""
    runs = finals(args.plan) if args.finals else dense(args.plan) if args.dense else PLANS[args.plan]
    todo = [r for r in runs if (not args.only or r["name"] in args.only)
            and not (RUNS / r["name"] / "timing.json").is_file()]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": THREADS}
    active: list[tuple[str, subprocess.Popen]] = []
    while todo or active:
        while todo and len(active) < args.jobs:
            r = todo.pop(0)
            print(f"{time.strftime('%H:%M:%S')} start {r['name']}", flush=True)
            log = open(RUNS.parent / f".zo_convergence-{r['name']}.log", "w")  # noqa: SIM115 - closed below
            child = subprocess.Popen([sys.executable, __file__, "_one", args.plan, r["name"]], env=env,
                                     stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
            active.append((r["name"], child, log))
        time.sleep(2)
        for item in list(active):
            name, child, log = item
            if child.poll() is None:
                continue
            active.remove(item)
            log.close()
            text = Path(log.name).read_text().strip().splitlines()
            print(f"{time.strftime('%H:%M:%S')} {name}: "
                  f"{text[-1] if child.returncode == 0 and text else 'failed: ' + chr(10).join(text[-15:])}",
                  flush=True)  # fmt: skip


# -- the report ----------------------------------------------------------------------------------------------
def _read(run: dict) -> dict | None:
    folder = RUNS / run["name"]
    if not (folder / "results.json").is_file() or not (folder / "timing.json").is_file():
        return None
    results = json.loads((folder / "results.json").read_text())
    timing = json.loads((folder / "timing.json").read_text())
    marks = {int(k): v for k, v in timing["steps"].items()}
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    cache = results.get("cache_forwards", 0.0)
    curve = [(r["forwards"] + cache, marks.get(r["step"], 0.0) / 60, r["dev_accuracy"], r["step"])
             for r in rows if "dev_accuracy" in r]  # fmt: skip
    return {**run, "results": results, "curve": curve, "minutes": timing["total"] / 60, "marks": marks,
            "backwards": results.get("backwards") or 0, "threads": timing.get("threads")}  # fmt: skip


def _first_reaching(curve, target: float):
    """``(forwards, minutes)`` of the first evaluation at or above ``target`` (None if never)."""
    for forwards, minutes, dev, _ in curve:
        if dev >= target:
            return forwards, minutes
    return None


def _score(run: dict) -> tuple[float, int]:
    """A grid's order: the highest best-dev accuracy, ties to the earlier step (a run that diverged before
    any dev evaluation counts as nothing)."""
    best = run["results"].get("best_dev")
    return (float("-inf"), 0) if best is None else (best, -(run["results"].get("best_step") or 0))


def _read_all(runs: list[dict]) -> list[dict]:
    """The runs of ``runs`` that have finished, read (:func:`_read`)."""
    return [r for r in map(_read, runs) if r is not None]


def choose(grid: list[dict]) -> dict[str, dict]:
    """Each group's chosen run among the read grid runs ``grid`` (seed 0; a group of one run: that run), by
    :func:`_score`; a full tie (same best dev at the same step) goes to the first in grid order, the smaller
    learning rate."""
    groups: dict[str, list[dict]] = {}
    for r in grid:
        groups.setdefault(r["group"], []).append(r)
    return {g: max(rs, key=_score) for g, rs in groups.items()}


def _earlier_row(folder: Path, group: str) -> dict | None:
    """A row read from an earlier run folder of docs/finetune.md (not rerun here); minutes from its log."""
    if not (folder / "results.json").is_file():
        return None
    res = json.loads((folder / "results.json").read_text())
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    elapsed = {r["step"]: r["elapsed"] for r in rows if "elapsed" in r}
    curve = [(r["forwards"], elapsed.get(r["step"], 0.0) / 60, r["dev_accuracy"], r["step"])
             for r in rows if "dev_accuracy" in r]  # fmt: skip
    config = json.loads((folder / "config.json").read_text())
    flags = {"lr": config["optim"]["lr"], "optimizer": config["method"]["optimizer"]}
    return {"group": group, "flags": flags, "results": res, "curve": curve,
            "minutes": res["wall_seconds"] / 60, "backwards": res.get("backwards") or 0}  # fmt: skip


def task_report(plan: str) -> dict | None:
    """One task's rows (each group's chosen run and the earlier runs read for it), or None before any run."""
    grid = _read_all(PLANS[plan])  # each run folder read once
    chosen = choose(grid)
    dense_runs = {r["group"]: r for r in _read_all(dense(plan, chosen))}
    seeds = _read_all(finals(plan, chosen))
    done = grid + seeds + list(dense_runs.values())
    chosen = {group: with_dense(run, dense_runs.get(group)) for group, run in chosen.items()}
    if not done:
        return None
    groups: dict[str, list[dict]] = {}
    for r in done:
        groups.setdefault(r["group"], []).append(r)
    mezo = chosen.get("MeZO")
    target = mezo["curve"][-1][2] if mezo else None
    earlier = {key: _earlier_row(*value) for key, value in EARLIER.get(plan, {}).items()}
    second = earlier["mezo-1000"]["curve"][-1][2] if earlier.get("mezo-1000") else None
    table = []
    rows = list(chosen.values()) + [r for r in earlier.values() if r is not None]
    for best in rows:
        group, res = best["group"], best["results"]
        same = [r for r in groups.get(group, [best]) if r["flags"] == best["flags"]]
        reach = _first_reaching(best["curve"], target) if target is not None else None
        reach2 = _first_reaching(best["curve"], second) if second is not None else None
        table.append({
            "task": plan, "method": group, "optimizer": best["flags"].get("optimizer"),
            "grid": sorted({r["flags"].get("lr") for r in groups.get(group, [best])}),
            "chosen_lr": best["flags"].get("lr"), "steps": res.get("steps"), "status": res.get("status"),
            "best_dev": res.get("best_dev"), "best_step": res.get("best_step"),
            "test_at_best_dev": res.get("test"), "test_seeds": [r["results"].get("test") for r in same],
            "forwards": round(best["curve"][-1][0], 1) if best["curve"] else None,
            "backwards": best.get("backwards", 0), "minutes": round(best["minutes"], 1),
            "threads": best.get("threads"),
            "cache_mib": res.get("cache_mib"), "cache_seconds": res.get("cache_seconds"),
            "forwards_to_mezo_final": None if reach is None else round(reach[0], 1),
            "minutes_to_mezo_final": None if reach is None else round(reach[1], 1),
            "forwards_to_second": None if reach2 is None else round(reach2[0], 1),
            "minutes_to_second": None if reach2 is None else round(reach2[1], 1),
        })  # fmt: skip
    plot(plan, rows)
    goals = {"accuracy": accuracy_goal(table)} if plan in ACCURACY_GOAL_TASKS else {}
    if mezo is not None:
        goals["forwards"] = forward_goal(table)
    return {"protocol": {**PROTOCOL, "task": plan}, "mezo_final_dev": target, "second_target": second,
            "goals": goals, "rows": table,
            "runs": [{k: r[k] for k in ("name", "group", "flags", "seed", "minutes", "curve")} | {
                "results": r["results"]} for r in done]}  # fmt: skip


def report(args) -> None:
    """Every task with runs, in one table (``zo_convergence.{json,md}``), and each task's two plots."""
    tasks = {plan: out for plan in PLANS if (out := task_report(plan)) is not None}
    out = {"threads": THREADS, "env": _env(), "tasks": tasks}
    atomic_write_json(RESULTS / "zo_convergence.json", out)
    atomic_write_text(RESULTS / "zo_convergence.md", markdown(out))
    print(markdown(out))


def _num(value, fmt: str = "{:g}") -> str:
    return "-" if value is None else fmt.format(value)


def markdown(out: dict) -> str:
    tasks = out["tasks"]
    lines = ["Each task's target is its tuned MeZO's final dev accuracy: "
             + ", ".join(f"{plan} {_num(t['mezo_final_dev'])}" for plan, t in tasks.items()), "",
             "| task | method | lr grid | chosen lr | steps | best dev | test at best dev | "
             "test, seeds 0/1/2 | forward passes | minutes | forwards to the target | minutes to it |",
             "|" + "---|" * 12]  # fmt: skip
    for r in (r for t in tasks.values() for r in t["rows"]):
        seeds = " / ".join(_num(t, "{:.1f}") for t in r["test_seeds"])
        forwards = _num(r["forwards"]) + (f" (+{r['backwards']} backward)" if r["backwards"] else "")
        status = "" if r["status"] in (None, "completed") else f" ({r['status']})"
        lines.append(f"| {r['task']} | {r['method']}{status} | {', '.join(f'{x:g}' for x in r['grid'])} | "
                     f"{_num(r['chosen_lr'])} | {_num(r['steps'])} | {_num(r['best_dev'], '{:.1f}')} | "
                     f"{_num(r['test_at_best_dev'], '{:.1f}')} | {seeds} | {forwards} | {r['minutes']:g}"
                     f"{'' if r.get('threads') in (None, '1') else ' (' + r['threads'] + ' threads)'} | "
                     f"{_num(r['forwards_to_mezo_final'])} | {_num(r['minutes_to_mezo_final'])} |")
    lines += ["", "The goals, decided by hdopt.finetune.budget_goals from the rows above:", ""]
    for plan, t in tasks.items():
        for goal in t["goals"].values():
            best = goal.get("best") or goal.get("fastest")
            found = ("none" if best is None else
                     f"{best['method']}: " + ", ".join(f"{k} {v:g}" for k, v in best.items()
                                                        if k not in ("task", "method")))  # fmt: skip
            budget = (f" (MeZO took {goal['mezo_forwards']:g}; a third is {goal['budget']:g})"
                      if "budget" in goal else "")  # fmt: skip
            lines.append(f"* {plan}: {goal['goal']}{budget}: **{'met' if goal['met'] else 'not met'}** "
                         f"(best: {found})")
    for plan, t in tasks.items():
        if t["second_target"] is None:
            continue
        lines += ["", f"{plan}: the second target, the 1000-step MeZO run's final dev accuracy: "
                  f"{_num(t['second_target'])}", "",
                  "| method | forwards to the second target | minutes to it |", "|---|---|---|"]  # fmt: skip
        lines += [f"| {r['method']} | {_num(r['forwards_to_second'])} | {_num(r['minutes_to_second'])} |"
                  for r in t["rows"]]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_paths(plan: str) -> dict[str, Path]:
    """The task's two plots (SST-2's keep their first names)."""
    stem = "zo_convergence" if plan == "sst2" else f"zo_convergence_{plan}"
    return {axis: ROOT / "docs" / "img" / f"{stem}_{axis}.png" for axis in ("forwards", "minutes")}


def _threads(rows: list[dict]) -> str:
    """The rows' torch threads a run, for the minutes axis: "1", or "1 (2: GROUP, ...)" when they differ."""
    others = {r["group"]: r["threads"] for r in rows if r.get("threads") not in (None, "1")}
    if not others:
        return "1"
    return f"1 ({', '.join(sorted(set(others.values())))}: {'; '.join(sorted(others))})"


def plot(plan: str, rows: list[dict]) -> None:
    """Dev accuracy against forward passes and against minutes (log axes: the points after the start)."""
    plt = pyplot()
    start = next((run["curve"][0][2] for run in rows if run["curve"]), None)
    axes = (("forwards", 0, "forward passes (K/L for a forward through K of L blocks; the cache included)"),
            ("minutes", 1, f"minutes (torch threads a run: {_threads(rows)}; shared 2-core CPU)"))
    colors = plt.get_cmap("tab20").colors  # one color per row (the default cycle repeats after ten)
    for axis, index, label in axes:
        fig, ax = plt.subplots(figsize=(9.5, 4.4))
        for i, run in enumerate(rows):
            points = [p for p in run["curve"] if p[index] > 0]
            style = "--" if _on_top(run) else "-"  # dashed: the top block
            if points:
                ax.plot([p[index] for p in points], [p[2] for p in points], marker=".", ls=style,
                        color=colors[(2 * i) % 20 + (2 * i) // 20 % 2],
                        label=f"{run['group']} (lr {run['flags'].get('lr'):g})")  # fmt: skip
        if start is not None:
            ax.axhline(start, ls=":", lw=1, color="grey", label=f"start (the prompt): dev {start:g}")
        ax.set_title(plan)
        ax.set_xlabel(label)
        ax.set_ylabel("dev accuracy (%)")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        save_figure(fig, plot_paths(plan)[axis])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--plan", default="sst2", choices=sorted(PLANS))
    p.add_argument("--only", nargs="*")
    p.add_argument("--finals", action="store_true", help="the final runs, chosen from the grids' results")
    p.add_argument("--dense", action="store_true", help="dense-start reruns of the chosen whole-model runs")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (with HDOPT_BENCH_THREADS threads)")
    sub.add_parser("report")
    p = sub.add_parser("_one")
    p.add_argument("plan")
    p.add_argument("name")
    args = parser.parse_args()
    if args.command == "_one":
        run_one(args.plan, args.name)
    elif args.command == "run":
        run(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
