"""Float32 vs float64 of TinT's reference rule in the few-shot benchmark's setting (docs/tint.md, "float32").

    PYTHONPATH=src python benchmarks/tint_precision.py            # measure, save, print the table
    PYTHONPATH=src python benchmarks/tint_precision.py table      # print the table from the saved results

Setting of ``benchmarks/tint.py fewshot``: SmolLM2-135M (float32), structured TinT, reference rule, top 3
blocks, 1 step, N = 1000, the label tokens of 32 concatenated demonstrations (the same demonstrations:
training pool minus the 16 dev examples, seeds 0-2). For each prompt the simulated weight update
``theta' - theta`` of the float32 model is compared with the float64 model's (the same weights cast), with
the rule's finite differences ``N [f(x + g/N) - f(x)]`` taken in the model's dtype (``fd_float64=False``,
the reference code's way) or in float64 (``fd_float64=True``, the default). Relative Frobenius errors over
all updated tensors and on the worst tensor; lr cancels (the update is linear in it). Results:
benchmarks/results/tint_precision.json (atomic write).
"""

from __future__ import annotations

import argparse
import platform
import random
import time
from pathlib import Path

import torch

from hdopt.tint import StructuredTinT, TinTConfig, build
from hdopt.tint import evaluate as ev
from hdopt.tint.data import TASKS, load_sentiment
from hdopt.tint.results import read_json, write_json

RESULTS = Path(__file__).parent / "results" / "tint_precision.json"
SEEDS = (0, 1, 2)
REDUCTIONS = ("mean", "sum")  # the benchmark's, and the reference's


def prompt(tok, task: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(context ids (1, T), label-token targets (1, T)) as benchmarks/tint.py run_fewshot draws them."""
    pool, reported = load_sentiment(task)
    rng = random.Random(1234)
    rng.sample(reported, 100)  # the first evaluation batch, drawn before the dev examples
    dev = rng.sample(pool, 16)
    demos = ev.sample_demos([e for e in pool if e not in dev], 32, seed)
    p = ev.build_prompt(tok, demos)
    ids = torch.tensor([p.ids])
    targets = torch.zeros_like(ids, dtype=torch.bool)
    targets[0, p.label_positions] = True
    return ids, targets


def update(tint: StructuredTinT, ids, targets, hidden, **overrides) -> dict[str, torch.Tensor]:
    """Simulated update theta' - theta (float64) of every tensor the rule changes, by name."""
    cfg = TinTConfig(**{**tint.config.to_dict(), **overrides})
    t = StructuredTinT(tint.spec, cfg)
    top, _ = t.adapt(ids, targets, hidden=hidden)
    out = {}
    for i, block in enumerate(tint.spec.blocks[t.first:]):
        for k, v in block.items():
            if not torch.equal(top[i][k][0], v):
                out[f"{t.first + i}.{k}"] = top[i][k][0].double() - v.double()
    return out


def errors(got: dict, want: dict) -> dict:
    per = {k: float((got[k] - want[k]).norm() / want[k].norm()) for k in want}
    num = sum(float((got[k] - want[k]).norm() ** 2) for k in want)
    worst = max(per, key=per.get)
    return {"overall": (num / sum(float(w.norm() ** 2) for w in want.values())) ** 0.5, "worst": per[worst],
            "worst_tensor": worst}


def measure(tasks=TASKS, seeds=SEEDS) -> dict:
    from hdopt.lm.models import load_model

    model, tok = load_model("smollm2-135m")
    cfg = TinTConfig(n_layers=3, n_steps=1, inner_lr=1.0, backward="reference")
    t32 = build(model, cfg)
    t64 = StructuredTinT(t32.spec.to(torch.float64), cfg)
    cells = []
    for task in tasks:
        for seed in seeds:
            t0 = time.time()
            ids, targets = prompt(tok, task, seed)
            h32, h64 = t32.lower(ids)[0], t64.lower(ids)[0]
            for reduction in REDUCTIONS:
                want = update(t64, ids, targets, h64, reduction=reduction)
                for fd64 in (False, True):
                    got = update(t32, ids, targets, h32, reduction=reduction, fd_float64=fd64)
                    cell = {"task": task, "seed": seed, "tokens": ids.shape[1], "labels": int(targets.sum()),
                            "reduction": reduction, "fd_float64": fd64, **errors(got, want)}
                    cells.append(cell)
                    print(cell, flush=True)
            print(f"{task} seed {seed}: {time.time() - t0:.0f}s", flush=True)
    out = {"setting": __doc__.split("\n\n")[2], "hardware": f"{platform.machine()} CPU, torch "
           f"{torch.__version__}, {torch.get_num_threads()} thread(s)", "cells": cells}
    write_json(RESULTS, out)
    return out


def table(results: dict) -> str:
    """Markdown: worst case over the prompts of each (reduction, where the differences are taken)."""
    lines = ["| loss | finite differences taken in | update error, all tensors: median / worst prompt "
             "| worst tensor (worst prompt) |", "|---|---|---|---|"]
    for reduction in REDUCTIONS:
        for fd64 in (False, True):
            cells = [c for c in results["cells"] if c["reduction"] == reduction and c["fd_float64"] == fd64]
            if not cells:
                continue
            overall = sorted(c["overall"] for c in cells)
            worst = max(cells, key=lambda c: c["worst"])
            where = "float64 (`fd_float64=True`, default)" if fd64 else "float32 (the model's dtype; before)"
            lines.append(f"| {reduction} | {where} | {overall[len(overall) // 2]:.2g} / {overall[-1]:.2g} | "
                         f"{worst['worst']:.2g} ({worst['worst_tensor']}) |")
    n = len({(c["task"], c["seed"]) for c in results["cells"]})
    tokens = sorted(c["tokens"] for c in results["cells"])
    lines.append(f"\n{n} prompts ({tokens[0]}-{tokens[-1]} tokens, 32 label tokens each); "
                 f"{results['hardware']}.")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", nargs="?", choices=["measure", "table"], default="measure")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = measure(args.tasks) if args.part == "measure" else read_json(RESULTS)
    if results is None:
        raise SystemExit(f"no results at {RESULTS}: run without 'table' first")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
