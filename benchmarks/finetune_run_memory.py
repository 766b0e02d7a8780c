"""The memory of a whole fine-tuning run against inference on the same batches (issue 14 items 6 and 7).

    python benchmarks/finetune_run_memory.py                      # SmolLM2-135M + SST-2, small budget
    python benchmarks/finetune_run_memory.py --src ../main/src --tag before   # another checkout's runs

For each method, two fresh processes, one after the other (never two at once):

* ``inference``: the run's model exactly as the run prepares it (``hdopt.finetune.trainer.setup``: the
  adapter, the ``--lp-init`` head), then forward passes over the same batches without gradients: every
  training micro-batch's loss once per step, and the dev and test evaluations the run makes;
* ``run``: ``hdopt.finetune.finetune`` with the same config (with ``--src``, another checkout's code).

The peak is the process's peak resident set (``ru_maxrss``, model loading included in both). Also recorded:
the run folder's size (weights kept or not), and, for ZO runs of this checkout, the cost of a resume:
the seconds to rebuild the checkpoint's weights by replaying the trajectory (``hdopt.zo.replay``) against
the training seconds of those steps. Results: benchmarks/results/finetune_run_memory[_TAG].json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SRC = Path(__file__).resolve().parents[1] / "src"
DATA_DIR = os.environ.get("HDOPT_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
METHODS = ("mezo", "mezo --lp-init", "mezo-lora", "mezo-prefix", "node-perturbation", "lp")


def config_fields(args: argparse.Namespace, method: str, folder: Path) -> dict:
    name, *flags = method.split()
    fields = dict(model=args.model, task="sst2", method=name, data_dir=args.data_dir,
                  num_train=args.num_train, num_dev=args.num_dev, num_eval=args.num_eval,
                  max_length=args.max_length, steps=args.steps, eval_every=args.eval_every, batch_size=16,
                  noise="rademacher", progress=False, output_dir=str(folder))  # fmt: skip
    if name == "lp":
        fields.update(steps=None, eval_every=None)
        del fields["noise"]
    if name == "read-adapters-exact":  # no directions drawn: --noise does not apply
        del fields["noise"]
    if "--lp-init" in flags:
        fields["lp_init"] = True
    return fields


# -- the children ------------------------------------------------------------------------------------------
def child_inference(fields: dict) -> dict:
    """Forward passes of the run's batches and evaluations, no gradients, on the run's prepared model."""
    import torch

    from hdopt.finetune.batches import micro_batches, step_indices
    from hdopt.finetune.config import RunConfig
    from hdopt.finetune.trainer import setup

    s = setup(RunConfig().replace(**fields))
    t = s.cfg.train
    start = time.perf_counter()
    s.model.eval()
    with torch.no_grad():
        for step in range(t.steps or 0):
            indices = step_indices(len(s.splits.train), t.batch_size, t.seed, step)
            for micro in micro_batches(indices, t.grad_accum):
                s.kind.closure([s.splits.train[i] for i in micro])()
        evaluations = 1 + (t.steps // t.eval_every if t.eval_every else 0) if t.steps else 1
        for _ in range(evaluations):
            s.evaluate(s.splits.dev)
        s.evaluate(s.splits.eval)
    return {"seconds": round(time.perf_counter() - start, 1)}


def child_run(fields: dict) -> dict:
    from hdopt.finetune.config import RunConfig
    from hdopt.finetune.trainer import finetune

    results, folder = finetune(RunConfig().replace(**fields))
    files = {p.name: p.stat().st_size for p in Path(folder).iterdir() if p.is_file()}
    return {"seconds": results.get("wall_seconds"), "steps": results.get("steps"),
            "test": results.get("test"), "folder_bytes": sum(files.values()), "files": files}  # fmt: skip


def child_replay(folder: str) -> dict:
    """Seconds to rebuild the checkpoint's weights from the trajectory (what a resume replays)."""
    from hdopt.finetune.adapters import trainable_parameters
    from hdopt.finetune.trained import RunRecord, replay_to, run_config, run_method, starting_model
    from hdopt.lm.models import load_model

    folder = Path(folder)
    cfg = run_config(folder)
    model, _ = load_model(cfg.model.model, cfg.model.dtype, cfg.model.device, cfg.model.cache_dir)
    model = starting_model(model, cfg, run_method(cfg), folder)
    start = time.perf_counter()
    steps = replay_to(folder, trainable_parameters(model), None, RunRecord.of(folder))
    return {"replay_seconds": round(time.perf_counter() - start, 2), "replayed_steps": steps}


def child(kind: str, payload: str) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("HDOPT_BENCH_THREADS", "1")))
    start = time.perf_counter()
    out = {"inference": child_inference, "run": child_run}[kind](json.loads(payload)) if kind != "replay" \
        else child_replay(payload)  # fmt: skip
    out["peak_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["process_seconds"] = round(time.perf_counter() - start, 1)
    print("RESULT " + json.dumps(out))


# -- the parent ----------------------------------------------------------------------------------------------
def spawn(kind: str, payload: str, src: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(SRC)]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__, "--child", kind, payload], capture_output=True,
                          text=True, env=env, timeout=3600)  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        return {"error": last}
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs=2, metavar=("KIND", "PAYLOAD"), help=argparse.SUPPRESS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=DATA_DIR)
    parser.add_argument("--num-train", type=int, default=256)
    parser.add_argument("--num-dev", type=int, default=32)
    parser.add_argument("--num-eval", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--src", type=Path, default=SRC, help="src/ of the checkout whose runs to measure")
    parser.add_argument("--tag", default=None, help="results file suffix (e.g. before)")
    parser.add_argument("--keep", action="store_true", help="keep the run folders (default: removed)")
    parser.add_argument("--table", action="store_true", help="only rewrite the .md from the saved .json")
    args = parser.parse_args()
    name = f"finetune_run_memory{'_' + args.tag if args.tag else ''}"
    if args.child:
        child(*args.child)
        return
    if args.table:
        from hdopt.io import atomic_write_text

        doc = json.loads((RESULTS / f"{name}.json").read_text())
        atomic_write_text(RESULTS / f"{name}.md", table(doc) + "\n")
        return
    work = RESULTS / "finetune_run_memory_runs"
    rows = []
    for method in args.methods:
        folder = work / method.replace(" ", "").replace("--", "-")
        shutil.rmtree(folder, ignore_errors=True)
        fields = config_fields(args, method, folder)
        inference = spawn("inference", json.dumps(fields), SRC)
        run = spawn("run", json.dumps(fields), args.src)
        row = {"method": method, "inference": inference, "run": run}
        if "error" not in run and "error" not in inference:
            row["ratio"] = round(run["peak_mib"] / inference["peak_mib"], 3)
        if args.src == SRC and method.startswith("mezo") and (folder / "trajectory.bin").is_file():
            row["replay"] = spawn("replay", str(folder), SRC)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    command = "python benchmarks/finetune_run_memory.py " + " ".join(sys.argv[1:])
    config = {k: v for k, v in vars(args).items() if k not in ("child", "src")}
    host = {"python": platform.python_version(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}  # fmt: skip
    doc = {"command": command.strip(), "src": str(args.src), "config": config, "host": host, "rows": rows}
    from hdopt.io import atomic_write_json, atomic_write_text

    atomic_write_json(RESULTS / f"{name}.json", doc, default=str)
    atomic_write_text(RESULTS / f"{name}.md", table(doc) + "\n")
    print(table(doc))


def size(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def table(doc: dict) -> str:
    lines = [f"Generated by `{doc['command']}` ({doc['host']['date_utc']} UTC, code from {doc['src']}).", "",
             "| method | inference peak | run peak | run / inference | run folder | resume: replay |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in doc["rows"]:
        inf, run = r["inference"], r["run"]
        if "error" in inf or "error" in run:
            lines.append(f"| {r['method']} | {inf.get('error', '')} | {run.get('error', '')} | - | - | - |")
            continue
        replay = r.get("replay")
        cost = "-"
        if replay and "error" not in replay and run.get("seconds"):
            share = replay["replay_seconds"] / run["seconds"]
            cost = (f"{replay['replay_seconds']:.1f} s, {replay['replayed_steps']} steps"
                    f" ({share:.0%} of training)")
        lines.append(f"| {r['method']} | {inf['peak_mib']:,.0f} MiB | {run['peak_mib']:,.0f} MiB | "
                     f"{r['ratio']:.2f}x | {size(run['folder_bytes'])} | {cost} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
