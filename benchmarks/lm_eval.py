"""Zero-shot and ICL baselines of the packaged small models on the MeZO tasks (CPU-sized by default).

    python benchmarks/lm_eval.py --data-dir ../shared/data              # the CPU profile (~30 min, 2 cores)
    python benchmarks/lm_eval.py --data-dir D --full --device cuda      # the paper's protocol (GPU)

The CPU profile cuts the protocol: ``--num-eval`` test examples per task (all of a smaller split; the
paper uses 1000) and fewer demonstrations for the passage tasks (BoolQ, SQuAD). Figures are written
after every run to benchmarks/results/lm_eval.json and lm_eval.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from hdopt.io import atomic_write_json, atomic_write_text
from hdopt.lm.evaluation import EvalConfig, run_eval
from hdopt.lm.models import load_model

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ["sst2", "rte", "cb", "boolq", "copa", "wic", "squad"]
LABELS = {
    "sst2": "SST-2",
    "rte": "RTE",
    "cb": "CB",
    "boolq": "BoolQ",
    "copa": "COPA",
    "wic": "WiC",
    "squad": "SQuAD",
}
# demonstrations per task in the CPU profile: 32 (the paper's) except the passage tasks
CPU_DEMOS = {"boolq": 8, "squad": 1}
# OPT-13B, MeZO paper Table 1 (accuracy; F1 for SQuAD)
OPT13B = {
    "zero-shot": {
        "sst2": 58.8,
        "rte": 59.6,
        "cb": 46.4,
        "boolq": 59.0,
        "copa": 80.0,
        "wic": 55.0,
        "squad": 46.2,
    },
    "icl": {"sst2": 87.0, "rte": 62.1, "cb": 57.1, "boolq": 66.9, "copa": 87.0, "wic": 50.5, "squad": 75.9},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--tasks", nargs="+", default=TASKS, choices=TASKS)
    parser.add_argument("--methods", nargs="+", default=["zero-shot", "icl"], choices=["zero-shot", "icl"])
    parser.add_argument("--num-eval", type=int, default=100, help="test examples per task (paper: 1000)")
    parser.add_argument("--full", action="store_true", help="paper protocol: 1000 test examples, 32 demos")
    parser.add_argument("--data-dir", default=os.environ.get("HDOPT_DATA_DIR"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (1 avoids thrashing a busy CPU)"
    )
    parser.add_argument("--out", default=str(RESULTS / "lm_eval"), help="output prefix (.json and .md)")
    parser.add_argument(
        "--merge", nargs="+", metavar="JSON", help="combine reports of separate runs into --out"
    )
    return parser.parse_args(argv)


def hardware(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), no GPU"


def markdown(report: dict) -> str:
    tasks = report["tasks"]
    columns = [LABELS[t] + (" (F1)" if t == "squad" else "") for t in tasks]
    lines = [
        "| model | method | test ex. | " + " | ".join(columns) + " | tokens/s |",
        "|---" * (len(tasks) + 4) + "|",
    ]
    for row in report["rows"]:
        cells = [row["model"], row["method"], str(row.get("num_eval", report["num_eval"]))]
        cells += [_cell(row["results"].get(t)) for t in tasks] + [str(row["tokens_per_second"])]
        lines.append("| " + " | ".join(cells) + " |")
    for method, scores in OPT13B.items():
        lines.append(
            f"| OPT-13B (paper) | {method} | 1000 | " + " | ".join(str(scores[t]) for t in tasks) + " | - |"
        )
    notes = [
        "",
        f"Hardware: {report['hardware']}; torch {report['torch']}; {report['threads']} threads; load average "
        f"{report['load_start']} at start, {report['load_end']} at end (the machine is shared).",
        f"Protocol: seed {report['seed']}; test examples per task: {_counts(report)}; "
        f"demonstrations: {report['demos_note']}; context 2048 tokens, demonstrations truncated on the left.",
        f"Command: {_quoted(report['command'])}; wall time {report['wall_minutes']} min.",
    ]
    return "\n".join(lines + notes) + "\n"


def _counts(report: dict) -> str:
    """The test examples each task used, per 'test ex.' setting (a split smaller than it gives fewer)."""
    seen: dict[int, dict[str, int]] = {}
    for row in report["rows"]:
        n = row.get("num_eval", report["num_eval"])
        for task, result in row["results"].items():
            seen.setdefault(n, {})[task] = result["num_eval"]
    return "; ".join(
        f"'{n}': " + ", ".join(f"{LABELS[t]} {k}" for t, k in counts.items()) for n, counts in seen.items()
    )


def _quoted(command: str) -> str:
    return command if command.startswith("`") else f"`{command}`"


def _cell(result: dict | None) -> str:
    if result is None:
        return "-"
    value = result.get("accuracy", result.get("f1"))
    return f"{value:.1f}"


def merge(paths: list[str], out: str) -> dict:
    """One report from several (one process per model, or a task rerun alone): rows of the same model,
    method and test size are joined, later files winning for a task they share."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    rows: dict[tuple, dict] = {}
    for report in reports:
        for row in report["rows"]:
            key = (row["model"], row["method"], row.get("num_eval", report["num_eval"]))
            joined = rows.setdefault(
                key, {"model": key[0], "method": key[1], "num_eval": key[2], "results": {}}
            )
            joined["results"].update(row["results"])
    for row in rows.values():
        tokens = sum(r["tokens"] for r in row["results"].values())
        row["tokens_per_second"] = round(tokens / sum(r["seconds"] for r in row["results"].values()), 1)
    merged = {**reports[0], "rows": list(rows.values())}
    merged["tasks"] = [t for t in TASKS if any(t in row["results"] for row in merged["rows"])]
    merged["demos"] = {t: n for r in reports for t, n in r["demos"].items()}
    merged["demos_note"] = ", ".join(f"{LABELS[t]} {merged['demos'][t]}" for t in merged["tasks"])
    merged["command"] = " and ".join(f"`{r['command']}`" for r in reports)
    merged["load_start"] = min(r["load_start"] for r in reports)
    merged["load_end"] = max(r["load_end"] for r in reports)
    merged["wall_minutes"] = max(r["wall_minutes"] for r in reports)
    atomic_write_json(out + ".json", merged, default=str)
    atomic_write_text(out + ".md", markdown(merged))
    return merged


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        print(markdown(merge(args.merge, args.out)))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    num_eval = 1000 if args.full else args.num_eval
    demos = {t: 32 if args.full else CPU_DEMOS.get(t, 32) for t in args.tasks}
    report = {
        "command": "python benchmarks/lm_eval.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "hardware": hardware(args.device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "seed": args.seed, "tasks": args.tasks, "demos": demos, "num_eval": num_eval,
        "demos_note": ", ".join(f"{LABELS[t]} {n}" for t, n in demos.items()),
        "load_start": round(os.getloadavg()[0], 1), "rows": [],
    }  # fmt: skip
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="hdopt-bench-") as runs:
        for name in args.models:
            load_model(name, args.dtype, args.device)  # converts on first use, imports transformers' code
            started = time.perf_counter()
            model, tokenizer = load_model(name, args.dtype, args.device)
            report.setdefault("load_seconds", {})[name] = round(time.perf_counter() - started, 2)
            for method in args.methods:
                row = {"model": name, "method": method, "num_eval": num_eval, "results": {}}
                report["rows"].append(row)
                for task in args.tasks:
                    cfg = EvalConfig(
                        model=name, task=task, method=method, num_eval=num_eval, num_demos=demos[task],
                        seed=args.seed, data_dir=args.data_dir, device=args.device, dtype=args.dtype,
                        output_dir=str(Path(runs) / f"{name}-{method}-{task}"), progress=False,
                    )  # fmt: skip
                    results, _ = run_eval(cfg, model, tokenizer)
                    row["results"][task] = results
                    tokens = sum(r["tokens"] for r in row["results"].values())
                    seconds = sum(r["seconds"] for r in row["results"].values())
                    row["tokens_per_second"] = round(tokens / seconds, 1)
                    score = results.get("accuracy", results.get("f1"))
                    rate, seconds = results["tokens_per_second"], results["seconds"]
                    print(
                        f"{name:14s} {method:9s} {task:6s} {score:6.1f} {rate:7.1f} tok/s {seconds:7.1f} s",
                        flush=True,
                    )
                    report["load_end"] = round(os.getloadavg()[0], 1)
                    report["wall_minutes"] = round((time.time() - start) / 60, 1)
                    atomic_write_json(args.out + ".json", report, default=str)
                    atomic_write_text(args.out + ".md", markdown(report))
            del model
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
