"""Benchmark: how long ``load_model(alias)`` takes on a converted cache, the old way and the new way.

Each measurement is a fresh Python process that first imports torch, transformers, ``hdopt.lm.models`` and
the model's transformers classes (the architecture and the tokenizer class, ~4 s here, timed apart as
``import_s``), then times one ``load_model(alias)`` call (model + tokenizer, ready to use): wall clock
(``load_s``) and this process's CPU time (``load_cpu_s``, less sensitive to other jobs on the machine).

* old: ``HDOPT_FAST_TOKENIZER=0``, the tokenizer read by ``AutoTokenizer.from_pretrained`` from
  ``tokenizer.json`` (what every load did before the fast tokenizer file);
* new: the default, the tokenizer rebuilt from ``hdopt-tokenizer.bin`` (:mod:`hdopt.lm.model_cache`).

The weights load the same way in both. Rounds interleave old and new for every model so machine noise hits
them alike; figures are medians over rounds, and the ratio is old / new of the medians. Before the rounds
one untimed load per model converts the GGUF (first use) and writes the fast tokenizer file if needed.

Run:  python benchmarks/model_load.py [--runs 7] [--models smollm2-135m gemma3-270m]
Saves benchmarks/results/model_load.json unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PATHS = {"old": {"HDOPT_FAST_TOKENIZER": "0"}, "new": {"HDOPT_FAST_TOKENIZER": "1"}}

CHILD = r"""
import json, sys, time
started = time.perf_counter()
import torch, transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from hdopt.lm.models import load_model, prepare
folder = prepare(sys.argv[1])
config = json.loads((folder / "config.json").read_text())
getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config["model_type"]])  # import the model's code
tokenizer_class = json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class")
getattr(transformers, tokenizer_class or "PreTrainedTokenizerFast", None)  # and the tokenizer's
imported = time.perf_counter()
cpu = time.process_time()
model, tokenizer = load_model(sys.argv[1])
load_s, load_cpu_s = time.perf_counter() - imported, time.process_time() - cpu
assert tokenizer("hello").input_ids and model.config.vocab_size
print("RESULT " + json.dumps({"import_s": imported - started, "load_s": load_s, "load_cpu_s": load_cpu_s}))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--runs", type=int, default=7, help="fresh processes per model and path (>= 5)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the measured processes")
    parser.add_argument("--out", type=Path, default=RESULTS / "model_load.json")
    return parser.parse_args(argv)


def measure(alias: str, path: str, threads: int) -> dict:
    """One fresh process loading ``alias`` the ``path`` way; its timings."""
    env = {**os.environ, **PATHS[path], "OMP_NUM_THREADS": str(threads)}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-c", CHILD, alias], env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"loading {alias} ({path}) failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def summary(runs: list[dict]) -> dict:
    keys = ("load_s", "load_cpu_s", "import_s")
    return {f"median_{k}": round(statistics.median(r[k] for r in runs), 3) for k in keys} | {
        "load_s": [round(r["load_s"], 3) for r in runs],
        "load_cpu_s": [round(r["load_cpu_s"], 3) for r in runs],
    }


def table(report: dict) -> str:
    rows = [
        "| model | old load (s) | new load (s) | old / new | old CPU (s) | new CPU (s) | imports (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for alias, entry in report["models"].items():
        old, new = entry["old"], entry["new"]
        cells = [alias, f"{old['median_load_s']:.2f}", f"{new['median_load_s']:.2f}",
                 f"{entry['ratio']:.1f}x", f"{old['median_load_cpu_s']:.2f}",
                 f"{new['median_load_cpu_s']:.2f}", f"{new['median_import_s']:.1f}"]  # fmt: skip
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    import tokenizers
    import torch
    import transformers

    from hdopt.io import atomic_write_bytes

    args = parse_args(argv)
    if args.runs < 1:
        raise SystemExit("--runs must be >= 1")
    for alias in args.models:  # convert on first use and write the fast tokenizer file: not timed
        measure(alias, "new", args.threads)
    runs: dict[str, dict[str, list[dict]]] = {a: {p: [] for p in PATHS} for a in args.models}
    for round_ in range(args.runs):
        for alias in args.models:
            for path in PATHS:
                runs[alias][path].append(measure(alias, path, args.threads))
        print(f"round {round_ + 1}/{args.runs} done", file=sys.stderr, flush=True)
    models = {}
    for alias, by_path in runs.items():
        entry = {path: summary(by_path[path]) for path in PATHS}
        entry["ratio"] = round(entry["old"]["median_load_s"] / entry["new"]["median_load_s"], 2)
        entry["cpu_ratio"] = round(entry["old"]["median_load_cpu_s"] / entry["new"]["median_load_cpu_s"], 2)
        models[alias] = entry
    report = {
        "command": "python benchmarks/model_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "hardware": f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), no GPU",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "python": platform.python_version(),
        },
        "runs": args.runs,
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "models": models,
    }
    report["table"] = table(report)
    print(report["table"])
    atomic_write_bytes(args.out, (json.dumps(report, indent=2) + "\n").encode())
    print(f"saved {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
