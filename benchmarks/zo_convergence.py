"""Forward-pass and CPU-time budgets of forward-only fine-tuning: MeZO, its successors, top-block ZO, and FT.

    python benchmarks/zo_convergence.py run [--plan sst2] [--only NAME ...]   # the plan's missing runs
    python benchmarks/zo_convergence.py report                                # tables, plots, results JSON

Every run is ``hdopt finetune`` on the SST-2 setup of docs/finetune.md (SmolLM2-135M, 1000 train / 100 dev /
200 test examples, 64 tokens, data seed 0), from the prompt (no --lp-init), in a fresh process with
``HDOPT_BENCH_THREADS`` torch threads (default 2: run it alone on the machine). Its folder goes under
``benchmarks/results/zo_convergence/NAME`` with ``timing.json``: the wall-clock seconds from the start of the
process (imports and model loading included) to the end of every step (the step's dev evaluation included)
and to the end of the run (the test evaluation included). A run that exists is not run again.

The plan lists, per task, the grids (one learning rate per run; the grid is stated in the table) and the
final runs (the chosen setting with three seeds). ``report`` reads whatever runs exist and writes
``benchmarks/results/zo_convergence.{json,md}`` and ``docs/img/zo_convergence_{forwards,minutes}.png``:
dev accuracy against forward passes (a forward through K of L blocks counts K/L; the bottom's cache counts
too) and against minutes, and per method the best dev accuracy, the test accuracy at the best-dev step, and
the forward passes and minutes it took to reach tuned MeZO's final dev accuracy.
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

from hdopt.io import atomic_write_json, atomic_write_text, save_figure
from hdopt.plotting import pyplot

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RUNS = RESULTS / "zo_convergence"
PLOTS = {"forwards": ROOT / "docs" / "img" / "zo_convergence_forwards.png",
         "minutes": ROOT / "docs" / "img" / "zo_convergence_minutes.png"}  # fmt: skip
THREADS = os.environ.get("HDOPT_BENCH_THREADS", "2")
DATA_DIR = os.environ.get("HDOPT_DATA_DIR", str(ROOT.parent / "shared" / "data"))
PROTOCOL = {"model": "smollm2-135m", "num_train": 1000, "num_dev": 100, "num_eval": 200, "max_length": 64,
            "data_seed": 0, "batch_size": 16}  # fmt: skip


def _run(name: str, group: str, label: str, task: str = "sst2", seed: int = 0, **flags) -> dict:
    """One planned run: ``group`` is the method row it belongs to, ``label`` its line in the plots."""
    return {"name": name, "group": group, "label": label, "task": task, "seed": seed, "flags": flags}


def _grid(prefix: str, group: str, lrs, task: str = "sst2", **flags) -> list[dict]:
    return [_run(f"{prefix}-lr{lr:g}", group, f"{group} lr {lr:g}", task, lr=lr, **flags) for lr in lrs]


def _seeds(prefix: str, group: str, task: str = "sst2", seeds=(1, 2), **flags) -> list[dict]:
    return [_run(f"{prefix}-seed{s}", group, f"{group} seed {s}", task, seed=s, **flags) for s in seeds]


# -- the plan ------------------------------------------------------------------------------------------------
# Full-model runs get the same budget of forward passes (FORWARDS); top-block runs (K = 1 of 30 blocks) run
# the paper's 20k steps, which cost fewer forward passes than that budget.
FORWARDS = 1000
ZO = dict(method="mezo", eval_every=50, schedule="constant")
TOP = dict(ZO, zo_blocks=1, eval_every=500)
PLANS: dict[str, list[dict]] = {
    "sst2": [
        *_grid("mezo", "MeZO", (1e-5, 3e-5, 1e-4), optimizer="zosgd", eps=1e-3, steps=FORWARDS // 2, **ZO),
        *_grid("fzoo", "FZOO", (1e-5, 5e-5, 2e-4), optimizer="fzoo", steps=FORWARDS // 9, **ZO),
        *_grid("hizoo", "HiZOO", (1e-5, 3e-5, 1e-4), optimizer="hizoo", steps=FORWARDS // 3, **ZO),
        *_grid("lozo", "LOZO", (1e-5, 3e-5, 1e-4), optimizer="lozo", steps=FORWARDS // 2, **ZO),
        *_grid("sparse", "Sparse-MeZO", (1e-5, 3e-5, 1e-4), optimizer="sparse-mezo", steps=FORWARDS // 2, **ZO),
        *_grid("top1-mezo", "MeZO, top block", (1e-4, 3e-4, 1e-3), optimizer="zosgd", eps=1e-3, steps=20000,
               **TOP),
        *_grid("top1-fzoo", "FZOO, top block", (5e-5, 2e-4, 1e-3), optimizer="fzoo", steps=20000 // 4, **TOP),
        _run("ft", "FT (AdamW)", "FT", method="ft", steps=250, eval_every=25),
    ],
}


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


def run_one(name: str) -> None:
    """(In the child process.) Run the planned run ``name`` and write its timing.json."""
    start = time.perf_counter()
    from hdopt.finetune.cli import config_overrides, configure
    from hdopt.finetune.config import RunConfig
    from hdopt.finetune.trainer import finetune

    run = next(r for plan in PLANS.values() for r in plan if r["name"] == name)
    marks: dict[int, float] = {}
    parser = argparse.ArgumentParser()
    configure(parser)
    cfg = RunConfig().replace(**config_overrides(parser.parse_args(_flags(run))))
    results, folder = finetune(cfg, on_step=lambda step: marks.__setitem__(step, time.perf_counter() - start))
    timing = {"steps": marks, "total": time.perf_counter() - start, "threads": THREADS, "env": _env()}
    atomic_write_json(Path(folder) / "timing.json", timing)
    print(json.dumps({"name": name, "test": results.get("test"), "seconds": round(timing["total"], 1)}))


def _env() -> dict:
    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}  # fmt: skip


def run(args) -> None:
    runs = [r for r in PLANS[args.plan] if not args.only or r["name"] in args.only]
    for r in runs:
        if (RUNS / r["name"] / "timing.json").is_file():
            continue
        print(f"{time.strftime('%H:%M:%S')} {r['name']}", flush=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": THREADS}
        done = subprocess.run([sys.executable, __file__, "_one", r["name"]], env=env, capture_output=True,
                              text=True)  # fmt: skip
        tail = (done.stdout.strip().splitlines() or [""])[-1]
        print(f"  {tail if done.returncode == 0 else 'failed: ' + done.stderr[-1500:]}", flush=True)


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
    return {**run, "results": results, "curve": curve, "minutes": timing["total"] / 60}


def _first_reaching(curve, target: float):
    """``(forwards, minutes)`` of the first evaluation at or above ``target`` (None if never)."""
    for forwards, minutes, dev, _ in curve:
        if dev >= target:
            return forwards, minutes
    return None


def _best_of_group(runs: list[dict]) -> dict:
    """The grid's choice: the highest best-dev accuracy (ties: the earlier step)."""
    return max(runs, key=lambda r: (r["results"]["best_dev"], -r["results"]["best_step"]))


def report(args) -> None:
    plan = PLANS[args.plan]
    done = [r for r in (_read(run) for run in plan) if r is not None]
    groups: dict[str, list[dict]] = {}
    for r in done:
        groups.setdefault(r["group"], []).append(r)
    chosen = {g: _best_of_group([r for r in rs if r["seed"] == 0] or rs) for g, rs in groups.items()}
    mezo = chosen.get("MeZO")
    target = mezo["curve"][-1][2] if mezo else None
    table = []
    for group, best in chosen.items():
        res = best["results"]
        seeds = [r["results"]["test"] for r in groups[group] if r["flags"] == best["flags"]]
        reach = _first_reaching(best["curve"], target) if target is not None else None
        table.append({
            "method": group, "grid": sorted({r["flags"].get("lr") for r in groups[group]}),
            "chosen_lr": best["flags"].get("lr"), "best_dev": res["best_dev"], "best_step": res["best_step"],
            "test_at_best_dev": res["test"], "test_seeds": seeds, "forwards": round(best["curve"][-1][0], 1),
            "minutes": round(best["minutes"], 1),
            "forwards_to_mezo_final": None if reach is None else round(reach[0], 1),
            "minutes_to_mezo_final": None if reach is None else round(reach[1], 1),
        })  # fmt: skip
    out = {"protocol": PROTOCOL, "plan": args.plan, "mezo_final_dev": target, "rows": table,
           "runs": [{k: r[k] for k in ("name", "group", "flags", "seed", "minutes", "curve")} | {
               "results": r["results"]} for r in done]}  # fmt: skip
    atomic_write_json(RESULTS / "zo_convergence.json", out)
    atomic_write_text(RESULTS / "zo_convergence.md", markdown(out))
    plot(done, chosen)
    print(markdown(out))


def markdown(out: dict) -> str:
    lines = [f"Tuned MeZO's final dev accuracy: {out['mezo_final_dev']}", "",
             "| method | lr grid | chosen lr | best dev | test at best dev | test, seeds | forward passes | "
             "minutes | forwards to MeZO's final dev | minutes to it |", "|" + "---|" * 10]  # fmt: skip
    for r in out["rows"]:
        seeds = ", ".join(f"{t:.1f}" for t in r["test_seeds"])
        lines.append(f"| {r['method']} | {', '.join(f'{x:g}' for x in r['grid'])} | {r['chosen_lr']:g} | "
                     f"{r['best_dev']:.1f} | {r['test_at_best_dev']:.1f} | {seeds} | {r['forwards']:g} | "
                     f"{r['minutes']:g} | {r['forwards_to_mezo_final'] or '-'} | "
                     f"{r['minutes_to_mezo_final'] or '-'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(done: list[dict], chosen: dict[str, dict]) -> None:
    plt = pyplot()
    for axis, index, label in (("forwards", 0, "forward passes (K/L for a top-block forward)"),
                               ("minutes", 1, "minutes on the 2-core CPU (whole run)")):  # fmt: skip
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for group, best in chosen.items():
            xs = [point[index] for point in best["curve"]]
            ax.plot(xs, [point[2] for point in best["curve"]], label=f"{group} (lr {best['flags'].get('lr'):g})")
        ax.set_xlabel(label)
        ax.set_ylabel("dev accuracy (%)")
        ax.set_xscale("log" if axis == "forwards" else "linear")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save_figure(fig, PLOTS[axis])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--plan", default="sst2", choices=sorted(PLANS))
    p.add_argument("--only", nargs="*")
    p = sub.add_parser("report")
    p.add_argument("--plan", default="sst2", choices=sorted(PLANS))
    p = sub.add_parser("_one")
    p.add_argument("name")
    args = parser.parse_args()
    if args.command == "_one":
        run_one(args.name)
    elif args.command == "run":
        run(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
