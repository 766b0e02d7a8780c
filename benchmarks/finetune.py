"""Forward-only fine-tuning (MeZO) against backprop on SmolLM2-135M: accuracy, memory and plots.

    python benchmarks/finetune.py memory      # peak RSS: inference / MeZO / MeZO-LoRA / FT-prefix / FT
    python benchmarks/finetune.py accuracy    # SST-2: zero-shot, ICL, LP, FT, FT-LoRA, MeZO (+LoRA, prefix)
    python benchmarks/finetune.py accuracy --methods mezo mezo+lozo   # METHOD+OPTIMIZER: a ZO successor
    python benchmarks/finetune.py accuracy --methods mezo mezo+hizoo --parallel 2   # side by side
    python benchmarks/finetune.py report      # Markdown tables + plot from the saved results (and, for MeZO
                                              # beside successors, the forward-pass goal from their runs)
    python benchmarks/finetune.py curves RUN_DIR... --out PNG   # dev accuracy vs forward passes of runs

On a GPU, ``--device cuda --tag NAME`` (memory, accuracy, report) measures with torch.cuda's allocator
and keeps the figures apart: benchmarks/results/finetune_{memory,accuracy}_NAME.json, run folders
NAME-TASK-METHOD, benchmarks/results/finetune_NAME.md and docs/img/finetune_dev_vs_forwards_NAME.png
(docs/finetune.md, "Benchmark 3 on a GPU", has the commands).

Every measurement runs in a fresh subprocess (memory is per process; one failure does not stop the rest).
Results: benchmarks/results/finetune_memory.json, benchmarks/results/finetune_accuracy.json, the run folders
under benchmarks/results/finetune_runs/, the tables in benchmarks/results/finetune.md and the plot
docs/img/finetune_dev_vs_forwards.png. Budget flags (--zo-steps, --fo-steps, --num-dev, --num-eval, ...)
are recorded with the results; defaults are the cut-down CPU protocol, the paper's is in docs/finetune.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hdopt.io import atomic_write_json, atomic_write_text, save_figure
from hdopt.plotting import pyplot

RESULTS = Path(__file__).parent / "results"
RUNS = RESULTS / "finetune_runs"
PLOT = Path(__file__).parents[1] / "docs" / "img" / "finetune_dev_vs_forwards.png"
MEMORY_MODES = ("inference", "mezo", "mezo-lora", "ft-prefix", "ft")
THREADS = os.environ.get("HDOPT_BENCH_THREADS", "1")  # torch threads per child (the CPU is shared)
DATA_DIR = os.environ.get("HDOPT_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
ACCURACY_METHODS = ("zero-shot", "mezo", "ft", "mezo-lora", "mezo-prefix", "ft-lora", "lp", "icl")


def tagged(name: str, tag: str | None, suffix: str = ".json") -> Path:
    """``RESULTS/name.json``, or ``RESULTS/name_TAG.json`` for a tagged (e.g. GPU) measurement."""
    return RESULTS / (f"{name}_{tag}{suffix}" if tag else f"{name}{suffix}")


def run_folder(tag: str | None, task: str, method: str) -> Path:
    return RUNS / (f"{tag}-{task}-{method}" if tag else f"{task}-{method}")


def read_json(path: Path, default):
    return json.loads(path.read_text()) if path.is_file() else default


def _env(device: str = "cpu") -> dict:
    env = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
           "load_average": os.getloadavg(), "threads": THREADS,
           "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}  # fmt: skip
    if device.startswith("cuda"):
        import torch

        env |= {"device": device, "gpu": torch.cuda.get_device_name(torch.device(device)),
                "torch": torch.__version__}  # fmt: skip
    return env


def _child(argv: list[str], timeout: float) -> dict | None:
    """Run this script with ``argv`` in a fresh process; its last stdout line is a JSON result."""
    cmd = [sys.executable, __file__, *argv]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": THREADS,
           "HDOPT_DATA_DIR": DATA_DIR}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        print(f"  timed out after {timeout:.0f} s: {' '.join(argv)}", flush=True)
        return None
    if done.returncode != 0:
        print(f"  failed ({done.returncode}): {' '.join(argv)}\n{done.stderr[-2000:]}", flush=True)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- memory ----------------------------------------------------------------------------------------------
def memory_one(args) -> dict:
    """One mode in this (fresh) process, measured by :mod:`hdopt.finetune.peak_memory` (LM loss over all
    positions of a random batch, as in references/mezo.md; the peak counter is reset after loading)."""
    from hdopt.finetune.peak_memory import probe

    row = probe(args.model, args.mode, args.batch, args.length, args.repeats, device=args.device)
    return {**row, "peak_rss_mib": row["peak_mib"], "loaded_rss_mib": row["loaded_mib"]}


def memory(args) -> None:
    out = tagged("finetune_memory", args.tag)
    rows = []
    for model in args.models:
        for mode in MEMORY_MODES:
            print(f"memory: {model} {mode}", flush=True)
            argv = ["memory-one", "--model", model, "--mode", mode, "--batch", str(args.batch),
                    "--length", str(args.length), "--repeats", str(args.repeats),
                    "--device", args.device]  # fmt: skip
            row = _child(argv, args.timeout)
            if row:
                rows.append(row)
                print(f"  peak {row['peak_rss_mib']:.0f} MiB, {row['seconds_per_step']} s/step", flush=True)
                atomic_write_json(out, {"env": _env(args.device), "rows": rows}, default=str)
    print(memory_table(rows))


def _ratio(by: dict, a: str, b: str) -> str:
    if a not in by or b not in by:
        return "-"
    return f"{by[a]['peak_rss_mib'] / by[b]['peak_rss_mib']:.2f}x"


def memory_table(rows: list[dict]) -> str:
    lines = ["| model | batch x length | inference | MeZO | MeZO-LoRA | FT-prefix | FT | MeZO / inference "
             "| FT / MeZO |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["mode"]: r for r in rows if r["model"] == model}
        cells = [f"{by[m]['peak_rss_mib']:,.0f} MiB" if m in by else "-" for m in MEMORY_MODES]
        shape = next(f"{r['batch']} x {r['length']}" for r in rows if r["model"] == model)
        lines.append(f"| {model} | {shape} | " + " | ".join(cells)
                     + f" | {_ratio(by, 'mezo', 'inference')} | {_ratio(by, 'ft', 'mezo')} |")  # fmt: skip
    return "\n".join(lines)


# -- accuracy --------------------------------------------------------------------------------------------
def eval_one(args) -> dict:
    """zero-shot / ICL on the test sample, through hdopt.lm."""
    from hdopt.lm.evaluation import EvalConfig, run_eval

    folder = run_folder(args.tag, args.task, args.method)
    cfg = EvalConfig(model=args.model, task=args.task, method=args.method, num_eval=args.num_eval,
                     num_train=args.num_train, num_dev=args.num_dev, num_demos=args.num_demos,
                     output_dir=str(folder), progress=False, device=args.device)  # fmt: skip
    start = time.perf_counter()
    results, _ = run_eval(cfg)
    return {"method": args.method, "test": results[results["metric"]], "best_dev": None, "steps": 0,
            "forwards": 0, "wall_seconds": round(time.perf_counter() - start, 1),
            "peak_memory_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "run": str(folder)}  # fmt: skip


def split_method(name: str) -> tuple[str, str | None]:
    """``"mezo+lozo"`` -> ``("mezo", "lozo")``: a method trained with another optimizer of its registry."""
    method, _, optimizer = name.partition("+")
    return method, optimizer or None


def _finetune_flags(args, name: str) -> list[str]:
    method, optimizer = split_method(name)
    zo = method.startswith("mezo")
    flags = ["--model", args.model, "--task", args.task, "--method", method,
             "--num-train", str(args.num_train), "--num-dev", str(args.num_dev),
             "--num-eval", str(args.num_eval), "--max-length", str(args.max_length),
             "--output-dir", str(run_folder(args.tag, args.task, name)), "--no-progress",
             "--device", args.device]  # fmt: skip
    if optimizer:
        flags += ["--optimizer", optimizer]
    if method != "lp":
        flags += ["--steps", str(args.zo_steps if zo else args.fo_steps),
                  "--eval-every", str(args.zo_eval_every if zo else args.fo_eval_every)]  # fmt: skip
    if args.dtype:
        flags += ["--dtype", args.dtype]
    if zo and args.noise:
        flags += ["--noise", args.noise]
    if name in args.lr:
        flags += ["--lr", str(args.lr[name])]
    return flags


def accuracy(args) -> None:
    if args.parallel < 1:
        raise SystemExit(f"--parallel is how many methods run at once: give 1 or more, not {args.parallel}")
    out = tagged("finetune_accuracy", args.tag)
    saved = read_json(out, {"rows": []})
    rows = [r for r in saved["rows"] if r["method"] not in args.methods]
    budget = vars(args) | {"lr": args.lr}
    lock = threading.Lock()

    def save() -> None:
        atomic_write_json(out, {"env": _env(args.device), "budget": budget, "rows": rows}, default=str)

    def measure(method: str) -> None:
        print(f"accuracy: {method}", flush=True)
        if method in ("zero-shot", "icl"):
            argv = ["eval-one", "--method", method, "--device", args.device, *_common(args)]
            row = _child(argv + (["--tag", args.tag] if args.tag else []), args.timeout)
        else:
            row = _child(["finetune-one", *_finetune_flags(args, method)], args.timeout)
        if row:
            row["method"] = method  # the name asked for (mezo+lozo), not only the run's method
            with lock:
                rows.append(row)
                print(f"  {method}: test {row['test']}, dev {row.get('best_dev')}, {row['wall_seconds']} s",
                      flush=True)  # fmt: skip
                save()

    save()  # the budget first (a deadline may stop every method; `report` reads their folders)
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        list(pool.map(measure, args.methods))
    print(accuracy_table(rows))


def _common(args) -> list[str]:
    return ["--model", args.model, "--task", args.task, "--num-train", str(args.num_train),
            "--num-dev", str(args.num_dev), "--num-eval", str(args.num_eval),
            "--num-demos", str(args.num_demos)]  # fmt: skip


def finetune_one(argv: list[str]) -> dict:
    """One ``hdopt finetune`` run (flags as on the command line) in a fresh folder."""
    import shutil

    from hdopt.finetune import cli
    from hdopt.finetune.config import RunConfig
    from hdopt.finetune.trainer import finetune

    parser = argparse.ArgumentParser()
    cli.configure(parser)
    args = parser.parse_args(argv)
    shutil.rmtree(args.output_dir, ignore_errors=True)  # a fresh run each time the benchmark runs
    results, folder = finetune(RunConfig().replace(**cli.config_overrides(args)))
    return {**results, "run": str(folder)}


def accuracy_table(rows: list[dict]) -> str:
    order = {m: i for i, m in enumerate(("zero-shot", "icl", "lp", "ft", "ft-lora", "mezo", "mezo-lora",
                                         "mezo-prefix"))}  # fmt: skip
    lines = ["| method | test acc. | best dev acc. | steps | forward passes | backward passes | wall time "
             "| peak memory |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(rows, key=lambda r: order.get(r["method"], 99)):
        dev = "-" if r.get("best_dev") is None else f"{r['best_dev']:.1f}"
        lines.append(f"| {r['method']} | {r['test']:.1f} | {dev} | {r['steps']} | {r.get('forwards', 0):,} | "
                     f"{r.get('backwards', 0):,} | {r['wall_seconds'] / 60:.1f} min | "
                     f"{r['peak_memory_mib']:,.0f} MiB |")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], out: Path = PLOT) -> None:
    """Dev accuracy vs forward-pass equivalents (a backward pass counted as two forwards)."""
    from hdopt.finetune.rundir import read_metrics

    fig, ax = pyplot().subplots(figsize=(6, 4))
    for r in rows:
        if not r.get("run") or r["method"] in ("zero-shot", "icl", "lp"):
            continue
        folder = RUNS / Path(r["run"]).name  # here, also for figures measured on another machine
        pts = [(m["forwards"] + 2 * m["backwards"], m["dev_accuracy"])
               for m in read_metrics(folder) if "dev_accuracy" in m]  # fmt: skip
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=r["method"])
    zero = next((r["test"] for r in rows if r["method"] == "zero-shot"), None)
    if zero is not None:
        ax.axhline(zero, color="grey", linestyle=":", label="zero-shot (test)")
    ax.set_xlabel("forward-pass equivalents on training batches (backward = 2 forwards)")
    ax.set_ylabel("dev accuracy (%)")
    ax.set_title("SmolLM2-135M, SST-2 (1000 train examples)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out, dpi=120)


def run_label(cfg) -> str:
    """``method [(LP init)], lr ..., schedule`` from a run's config."""
    lp = " (LP init)" if cfg.method.lp_init else ""
    return f"{cfg.method.method}{lp}, lr {cfg.optim.lr:g}, {cfg.optim.schedule}"


def curves(args) -> None:
    """Dev accuracy against training compute for finished run folders: forward passes over single
    examples, a backward pass counted as two (so FT's batches of 8 and MeZO's of 16 share one scale).

    An ``--lp-init`` run's curve starts after the probe's one forward pass per train and dev example.
    """
    from hdopt.finetune.rundir import read_metrics
    from hdopt.finetune.trained import run_config

    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    for folder in map(Path, args.runs):
        cfg = run_config(folder)
        start = cfg.data.num_train + cfg.data.num_dev if cfg.method.lp_init else 0
        size = cfg.train.batch_size // cfg.train.grad_accum  # examples per counted pass
        pts = [(start + size * (m["forwards"] + 2 * m["backwards"]), m["dev_accuracy"])
               for m in read_metrics(folder) if "dev_accuracy" in m]  # fmt: skip
        test = read_json(folder / "results.json", {}).get("test")
        label = run_label(cfg) + (f" (test {test:.1f})" if test is not None else "")
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", markersize=3, label=label)
    if args.zero_shot is not None:
        label = f"zero-shot (test {args.zero_shot:.1f})"
        ax.axhline(args.zero_shot, color="grey", linestyle=":", label=label)
    ax.set_xlabel("example forward passes (a backward pass counted as 2)")
    ax.set_ylabel("dev accuracy (%)")
    ax.set_title(args.title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_figure(fig, args.out, dpi=120)
    print(f"wrote {args.out}")


def run_progress(folder: Path) -> tuple[list[tuple[float, float]], str]:
    """A run folder's (forward passes, dev accuracy) at each dev evaluation, and how far it got (``"S of N
    steps"``), whether the run finished or a deadline stopped it."""
    from hdopt.finetune.rundir import read_metrics

    metrics = read_metrics(folder)
    curve = [(m["forwards"], m["dev_accuracy"]) for m in metrics if "dev_accuracy" in m]
    planned = read_json(folder / "config.json", {}).get("train", {}).get("steps")
    return curve, f"{max((m.get('step', 0) for m in metrics), default=0)} of {planned} steps"


def successor_goals(tag: str | None, task: str) -> list[str]:
    """The forward-pass goal of docs/finetune.md (a successor reaches MeZO's final dev accuracy with at most a
    third of MeZO's forward passes) for each ZO method whose run folder stands beside successors' (``mezo``
    and ``mezo+hizoo``, ...): read from the folders, so a run a deadline stopped counts up to its last
    evaluation."""
    from hdopt.finetune.budget_goals import SUCCESSORS, forward_goal, rows_from_curves

    prefix = f"{tag}-{task}-" if tag else f"{task}-"
    folders = {p.name[len(prefix):]: p for p in sorted(RUNS.glob(prefix + "*")) if p.is_dir()}
    parts = {name: split_method(name) for name in folders}  # name -> (method, optimizer or None)
    lines = []
    for base in (name for name, (_, optimizer) in parts.items() if optimizer is None):
        successors = {name: optimizer for name, (method, optimizer) in parts.items()
                      if method == base and optimizer in SUCCESSORS}  # fmt: skip
        if not successors:
            continue
        progress = {m: run_progress(folders[m]) for m in (base, *successors)}
        curves = {m: curve for m, (curve, _) in progress.items()}
        done = ", ".join(f"{m} {steps}" for m, (_, steps) in progress.items())
        try:
            rows = rows_from_curves(curves[base], {m: (x, curves[m]) for m, x in successors.items()}, task)
            goal = forward_goal(rows)
        except ValueError as err:
            lines.append(f"- {base}: no verdict: {err} ({done})")
            continue
        fastest = goal["fastest"]
        best = "none reached it" if fastest is None else f"{fastest['method']}: {fastest['forwards']:g}"
        lines.append(f"- {base}: {goal['goal']}: **{'met' if goal['met'] else 'not met'}** (MeZO's final "
                     f"dev {curves[base][-1][1]:g}, first reached after {goal['mezo_forwards']:g} forwards; "
                     f"a third is {goal['budget']:g}; fastest successor {best}; {done})")  # fmt: skip
    return lines


def report(args) -> None:
    mem = read_json(tagged("finetune_memory", args.tag), {"rows": []})
    acc = read_json(tagged("finetune_accuracy", args.tag), {"rows": [], "budget": {}})
    command = "python benchmarks/finetune.py report" + (f" --tag {args.tag}" if args.tag else "")
    text = [f"# hdopt finetune benchmark (generated by `{command}`)", ""]
    if mem["rows"]:
        heading = "## Peak memory (RSS on CPU, CUDA max_memory_allocated on GPU; fresh process per cell)"
        text += [heading, "", memory_table(mem["rows"]), "",
                 f"environment: {json.dumps(mem.get('env'))}", ""]  # fmt: skip
    if acc["rows"]:
        plot(acc["rows"], PLOT.with_name(f"{PLOT.stem}_{args.tag}.png") if args.tag else PLOT)
        text += ["## Accuracy", "", accuracy_table(acc["rows"]), "", f"budget: {json.dumps(acc['budget'])}",
                 f"environment: {json.dumps(acc.get('env'))}", ""]  # fmt: skip
    goals = successor_goals(args.tag, acc.get("budget", {}).get("task", "sst2"))
    if goals:
        heading = "## MeZO's final dev accuracy reached by a successor (the goal: a third of MeZO's forwards)"
        text += [heading, "", *goals, ""]
    atomic_write_text(tagged("finetune", args.tag, ".md"), "\n".join(text))
    print("\n".join(text))


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    sub = parser.add_subparsers(dest="part", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    m.add_argument("--batch", type=int, default=16)
    m.add_argument("--length", type=int, default=32)
    m.add_argument("--repeats", type=int, default=2)
    m.add_argument("--timeout", type=float, default=900)
    m.add_argument("--device", default="cpu", help="cpu (peak RSS) or cuda (max_memory_allocated)")
    m.add_argument("--tag", default=None, help="keep these figures apart, e.g. h100 (see the top)")
    one = sub.add_parser("memory-one")
    one.add_argument("--model", required=True)
    one.add_argument("--mode", choices=MEMORY_MODES, required=True)
    one.add_argument("--batch", type=int, default=16)
    one.add_argument("--length", type=int, default=32)
    one.add_argument("--repeats", type=int, default=2)
    one.add_argument("--device", default="cpu")
    a = sub.add_parser("accuracy")
    a.add_argument("--model", default="smollm2-135m")
    a.add_argument("--task", default="sst2")
    a.add_argument("--methods", nargs="+", default=list(ACCURACY_METHODS),
                   help="also METHOD+OPTIMIZER, e.g. mezo+lozo (hdopt finetune --optimizer)")
    a.add_argument("--num-train", type=int, default=1000)
    a.add_argument("--num-dev", type=int, default=100, help="dev examples (paper: 500)")
    a.add_argument("--num-eval", type=int, default=200, help="test examples (paper: 1000)")
    a.add_argument("--num-demos", type=int, default=32)
    a.add_argument("--max-length", type=int, default=64)
    a.add_argument("--zo-steps", type=int, default=100, help="paper: 20000")
    a.add_argument("--fo-steps", type=int, default=60, help="paper: 625 (5 epochs)")
    a.add_argument("--zo-eval-every", type=int, default=25)
    a.add_argument("--fo-eval-every", type=int, default=20)
    a.add_argument("--noise", choices=("gaussian", "rademacher"), default=None)
    a.add_argument("--lr", type=json.loads, default={}, help='per-method lr, e.g. \'{"mezo": 1e-5}\'')
    a.add_argument("--timeout", type=float, default=3600)
    a.add_argument("--parallel", type=int, default=1,
                   help="methods measured at once, each in its own process (MeZO beside a successor: GPU)")
    a.add_argument("--device", default="cpu", help="cpu or cuda")
    a.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    a.add_argument("--tag", default=None, help="keep these figures apart, e.g. h100 (see the top)")
    e = sub.add_parser("eval-one")
    for flag in ("--model", "--task", "--method"):
        e.add_argument(flag, required=True)
    for flag in ("--num-train", "--num-dev", "--num-eval", "--num-demos"):
        e.add_argument(flag, type=int, required=True)
    e.add_argument("--device", default="cpu")
    e.add_argument("--tag", default=None)
    sub.add_parser("finetune-one", add_help=False)
    r = sub.add_parser("report")
    r.add_argument("--tag", default=None, help="report the figures measured with this --tag")
    c = sub.add_parser("curves")
    c.add_argument("runs", nargs="+", help="finished run folders")
    c.add_argument("--out", default=str(PLOT.with_name("finetune_long_runs.png")))
    c.add_argument("--zero-shot", type=float, default=None, help="draw the zero-shot test accuracy")
    c.add_argument("--title", default="SmolLM2-135M, SST-2 (1000 train, 100 dev examples)")
    if len(sys.argv) > 1 and sys.argv[1] == "finetune-one":
        print(json.dumps(finetune_one(sys.argv[2:])))
        return
    args = parser.parse_args()
    if args.part == "memory-one":
        print(json.dumps(memory_one(args)))
    elif args.part == "eval-one":
        print(json.dumps(eval_one(args)))
    else:
        {"memory": memory, "accuracy": accuracy, "report": report, "curves": curves}[args.part](args)


if __name__ == "__main__":
    main()
