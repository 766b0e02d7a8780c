"""The compact explicit TinT network (hdopt.tint.compact) measured: sizes, time and memory, and agreement.

    python benchmarks/tint.py sizes                      # -> results/tint_sizes.json
    python benchmarks/tint.py compact                    # -> results/tint_compact_speed.json
    python benchmarks/tint.py agreement --dtype float64  # -> results/tint_compact_agreement.json (resumable)

Run through benchmarks/tint.py (one torch thread). The tables are rendered by ``benchmarks/tint.py tables``.
"""

from __future__ import annotations

import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from hdopt.tint import TinTConfig, build, from_hf
from hdopt.tint import evaluate as ev
from hdopt.tint.compact import compact_tint
from hdopt.tint.data import load_sentiment
from hdopt.tint.results import read_json, write_json
from hdopt.tint.size import size_table

RESULTS = Path(__file__).parent / "results"
SIZE_ROWS = [("gpt2-shape", 12, 1), ("gpt2-shape", 6, 2), ("opt-125m-shape", 12, 1), ("smollm2-135m", 3, 1),
             ("smollm2-135m", 12, 1)]
SPEED_CELLS = [("smollm2", "structured", 3), ("smollm2", "compact", 3), ("gpt2-random", "compact", 12)]
LAYERS, STEPS, SHOTS = 3, 1, 32
PROTOCOL = {
    "hardware": "2-core CPU shared with other jobs, no GPU, one torch thread",
    "tint": f"backward='reference', top {LAYERS} layers, {STEPS} step, mean loss on the demonstrations' label"
            " tokens (the few-shot protocol of benchmarks/tint.py fewshot)",
    "speed": "one process per cell; input = the 32-shot SST-2 prompt of demonstration seed 0 (SmolLM2 tokens)"
             " + one test query; peak RSS above the loaded model (includes building the network);"
             " gpt2-random = GPT-2 124M shape with random weights (no GPT-2 weights offline), same token ids",
    "agreement": "the first 100-example batch of benchmarks/tint.py fewshot (same tests, dev split and"
                 " demonstrations, the TinT lr chosen there); compact network = its own forward pass with 25"
                 " queries packed per pass (each sees the demonstrations and itself); structured = the rule"
                 " computed by index/einsum ops, in float32 and float64",
}


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown table lines."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |"
                                                                           for r in rows]


def load_aux():
    from hdopt.lm.models import load_model

    return load_model("smollm2-135m")


# ---------------------------------------------------------------- sizes
def run_sizes() -> list[dict]:
    rows = [size_table(aux, layers, steps) for aux, layers, steps in SIZE_ROWS]
    write_json(RESULTS / "tint_sizes.json", {"rows": rows})
    return rows


def sizes_markdown() -> list[str]:
    saved = read_json(RESULTS / "tint_sizes.json")
    if not saved:
        return []
    header = ["auxiliary, L x S", "aux params", "compact: modules + embeddings",
              "compact: + prefix values (as the reference counts)", "same, closed form", "reference, reused",
              "compact, modules shared within a block only", "compact, one module per application",
              "unpacked explicit, reused", "W / prefix rows / S", "modules / applications"]
    rows = []
    for t in saved["rows"]:
        c, f, ref = t["compact"], t["compact_formula"], t["reference"]
        rows.append([f"{t['aux']}, {t['layers']} x {t['steps']}", f"{t['aux_params']:,}",
                     f"{c['params_reused']:,}", f"**{c['params_reused_with_prefix']:,}**",
                     f"{f['params_reused_with_prefix']:,}", f"{ref[0]:,}" if ref else "-",
                     f"{c['params_layer_scoped_with_prefix']:,}", f"{c['params_no_reuse_with_prefix']:,}",
                     f"{t['explicit']['params_reused']:,}",
                     f"{c['width']:,} / {c['prefix_rows']:,} / {c['groups']['ln']['slots']}",
                     f"{c['modules']} / {c['module_applications']:,}"])
    return md_table(header, rows)


# ---------------------------------------------------------------- time and memory of one forward pass
def fewshot_draw(task: str, n_eval: int = 100, n_dev: int = 16):
    """(tests, demonstration pool) exactly as benchmarks/tint.py fewshot draws its first batch."""
    pool, reported = load_sentiment(task)
    rng = random.Random(1234)
    tests = rng.sample(reported, n_eval)
    dev = rng.sample(pool, n_dev)
    return tests, [e for e in pool if e not in dev]


def speed_one(model_name: str, kind: str, layers: int) -> dict:
    """Build time, forward time and peak memory of one TinT pass over a 32-shot prompt and one query."""
    model, tok = load_aux()
    if model_name == "gpt2-random":
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config()).eval()
    tests, demo_pool = fewshot_draw("sst2")
    prompt = ev.build_prompt(tok, ev.sample_demos(demo_pool, SHOTS, 0))
    ids = torch.tensor([prompt.ids + ev.query_ids(tok, tests[0][0])])
    targets = torch.zeros_like(ids, dtype=torch.bool)
    targets[0, prompt.label_positions] = True
    with torch.no_grad():  # page in the weights so that they do not count as the pass's memory
        sum(float(p.sum()) for p in model.parameters())
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = TinTConfig(n_layers=layers, n_steps=STEPS, inner_lr=1e-2, backward="reference",
                     max_len=ids.shape[1] + 1, realization="compact" if kind == "compact" else "structured")
    t0 = time.perf_counter()
    tint = build(model, cfg)
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    tint(ids, context_len=len(prompt.ids), targets=targets)
    forward = time.perf_counter() - t0
    out = {"model": model_name, "kind": kind, "layers": layers, "tokens": ids.shape[1],
           "build_seconds": built, "forward_seconds": forward,
           "peak_extra_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}
    if kind == "compact":
        size = tint.size_report()
        out.update({k: size[k] for k in ("width", "prefix_rows", "modules", "module_applications",
                                         "params_reused_with_prefix")})
    return out


def run_speed() -> list[dict]:
    """Each cell in a fresh process so that its peak memory is its own."""
    out = []
    for model_name, kind, layers in SPEED_CELLS:
        cmd = [sys.executable, str(Path(__file__).parent / "tint.py"), "_compact_one", model_name, kind,
               str(layers)]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        out.append(json.loads(line))
        print(out[-1], flush=True)
        write_json(RESULTS / "tint_compact_speed.json", {"protocol": PROTOCOL, "cells": out})
    return out


def speed_markdown() -> list[str]:
    saved = read_json(RESULTS / "tint_compact_speed.json")
    if not saved:
        return []
    header = ["auxiliary", "TinT", "simulated layers x steps", "tokens", "build (s)", "forward (s)",
              "peak extra RSS (MB)", "network parameters (+ prefix values)"]
    rows = [[c["model"], c["kind"], f"{c['layers']} x {STEPS}", str(c["tokens"]), f"{c['build_seconds']:.1f}",
             f"{c['forward_seconds']:.1f}", f"{c['peak_extra_mb']:,.0f}",
             f"{c['params_reused_with_prefix']:,}" if "params_reused_with_prefix" in c else "-"]
            for c in saved["cells"]]
    return md_table(header, rows)


# ---------------------------------------------------------------- agreement with the structured rule
def chosen_lr(task: str) -> float:
    """The TinT lr that benchmarks/tint.py fewshot chose on its dev split for 32 shots."""
    cells = read_json(RESULTS / f"tint_fewshot_{task}.json", {"cells": {}})["cells"]
    return cells.get(f"{task}/{SHOTS}/0/tint", {}).get("lr", 1e-2)


def run_agreement(tasks=("sst2", "cr"), dtype: str = "float64", seeds=(0,), batch: int = 25) -> dict:
    """Label logits of the compact network (``dtype``) and of the structured rule (float32 and float64) on
    the same 100 test queries; cells are saved per query batch, so a rerun resumes."""
    path = RESULTS / "tint_compact_agreement.json"
    saved = read_json(path, {"protocol": PROTOCOL, "cells": {}})
    cells = saved["cells"]
    model, tok = load_aux()
    specs = {name: from_hf(model).to(getattr(torch, name)) for name in ("float32", "float64")}
    nets: dict[float, torch.nn.Module] = {}
    for task in tasks:
        tests, demo_pool = fewshot_draw(task)
        lr = chosen_lr(task)
        cfg = TinTConfig(n_layers=LAYERS, n_steps=STEPS, inner_lr=lr, backward="reference", max_len=4096)
        cells[f"{task}/labels"] = [y for _, y in tests]
        for seed in seeds:
            demos = ev.sample_demos(demo_pool, SHOTS, seed)
            for name, spec in specs.items():
                key = f"{task}/{seed}/structured/{name}"
                if key not in cells:
                    logits = ev.label_logits_many({"tint": ("tint", build(spec, cfg))}, model, tok, demos,
                                                  tests)["tint"]
                    cells[key] = {"logits": logits.tolist(), "lr": lr}
                    write_json(path, saved)
            for j in range(0, len(tests), batch):
                key = f"{task}/{seed}/compact/{dtype}/{j}"
                if key in cells:
                    continue
                if lr not in nets:
                    t0 = time.perf_counter()
                    net_cfg = TinTConfig(**{**cfg.to_dict(), "realization": "compact"})
                    nets[lr] = compact_tint(specs[dtype], net_cfg)
                    print(f"built the compact network ({dtype}, lr {lr}) in {time.perf_counter() - t0:.1f}s")
                t0 = time.perf_counter()
                logits = ev.compact_label_logits(nets[lr], tok, demos, tests[j:j + batch], batch)
                cells[key] = {"logits": logits.tolist(), "seconds": time.perf_counter() - t0, "lr": lr,
                              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
                print(f"{key}: {cells[key]['seconds']:.0f}s", flush=True)
                write_json(path, saved)
    return saved


def agreement_rows() -> list[dict]:
    """One row per (task, seed, dtype) with all its query batches: accuracies and agreement statistics."""
    saved = read_json(RESULTS / "tint_compact_agreement.json")
    if not saved:
        return []
    cells, rows = saved["cells"], []
    groups = sorted({tuple(k.split("/")[:4]) for k in cells if "/compact/" in k})
    for task, seed, _, dtype in groups:
        parts = sorted((int(k.split("/")[-1]), v) for k, v in cells.items()
                       if k.startswith(f"{task}/{seed}/compact/{dtype}/"))
        got = torch.tensor([row for _, v in parts for row in v["logits"]], dtype=torch.float64)
        n = got.shape[0]
        labels = torch.tensor(cells[f"{task}/labels"][:n])
        ref = {d: torch.tensor(cells[f"{task}/{seed}/structured/{d}"]["logits"][:n], dtype=torch.float64)
               for d in ("float32", "float64")}
        same = ev.agreement(got, ref[dtype])
        rows.append({"task": task, "seed": int(seed), "dtype": dtype, "n": n, "lr": parts[0][1]["lr"],
                     "compact_accuracy": ev.accuracy(got, labels),
                     "structured_accuracy": ev.accuracy(ref[dtype], labels), **same,
                     "structured_fp32_accuracy": ev.accuracy(ref["float32"], labels),
                     "fewshot_cell_accuracy": _fewshot_cell(task, int(seed)),
                     "compact_vs_fp64_rule": float((got - ref["float64"]).abs().max()),
                     "structured_fp32_vs_fp64_rule": float((ref["float32"] - ref["float64"]).abs().max()),
                     "structured_fp32_agreement_with_fp64": ev.agreement(ref["float32"], ref["float64"])[
                         "agreement"],
                     "seconds_per_query": sum(v["seconds"] for _, v in parts) / n,
                     "peak_rss_mb": max(v["peak_rss_mb"] for _, v in parts)})
    return rows


def _fewshot_cell(task: str, seed: int) -> float | None:
    """The accuracy benchmarks/tint.py fewshot saved for this batch (structured, float32)."""
    cells = read_json(RESULTS / f"tint_fewshot_{task}.json", {"cells": {}})["cells"]
    return cells.get(f"{task}/{SHOTS}/{seed}/tint", {}).get("acc")


def agreement_markdown() -> list[str]:
    header = ["task", "demo seed", "precision", "examples", "accuracy: network / structured rule",
              "prediction agreement", "largest label-logit difference", "network vs the float64 rule",
              "structured float32 vs the float64 rule (agreement)",
              "structured float32 accuracy / the few-shot table's", "seconds per query", "peak RSS (MB)"]
    rows = [[r["task"], str(r["seed"]), r["dtype"], str(r["n"]),
             f"{100 * r['compact_accuracy']:.1f} / {100 * r['structured_accuracy']:.1f}",
             f"{100 * r['agreement']:.1f}%", f"{r['max_abs_logit_diff']:.2g}",
             f"{r['compact_vs_fp64_rule']:.2g}",
             f"{r['structured_fp32_vs_fp64_rule']:.2g} "
             f"({100 * r['structured_fp32_agreement_with_fp64']:.0f}%)",
             f"{100 * r['structured_fp32_accuracy']:.1f} / "
             + (f"{100 * r['fewshot_cell_accuracy']:.1f}" if r["fewshot_cell_accuracy"] is not None else "-"),
             f"{r['seconds_per_query']:.1f}", f"{r['peak_rss_mb']:,.0f}"] for r in agreement_rows()]
    return md_table(header, rows) if rows else []


# ---------------------------------------------------------------- tiny-model checks
def run_checks() -> dict:
    from hdopt.tint.compact.checks import report

    out = report()
    write_json(RESULTS / "tint_compact_checks.json", out)
    return out


def checks_markdown() -> list[str]:
    saved = read_json(RESULTS / "tint_compact_checks.json")
    if not saved:
        return []
    both = ("1step_sum", "2step_mean")
    rows = [("compact vs structured, float64, 1 step sum / 2 steps mean (<= 1e-10)",
             lambda a: " / ".join(f"{saved[f'compact_vs_structured_fp64/{a}/{s}']:.1e}" for s in both)),
            ("sliced executor vs the modules' dense forward, float64, same (<= 1e-10)",
             lambda a: " / ".join(f"{saved[f'sliced_vs_dense_fp64/{a}/{s}']:.1e}" for s in both)),
            ("compact network, float32, vs the float64 rule",
             lambda a: f"{saved[f'compact_fp32_vs_fp64_rule/{a}']:.1e}"),
            ("structured, float32, vs the float64 rule (for comparison)",
             lambda a: f"{saved[f'structured_fp32_vs_fp64_rule/{a}']:.1e}"),
            ("compact network / structured, bfloat16, vs the float64 rule",
             lambda a: f"{saved[f'compact_bf16_vs_fp64_rule/{a}']:.2f} / "
                       f"{saved[f'structured_bf16_vs_fp64_rule/{a}']:.2f}")]
    return md_table(["check (relative error of the logit change, worst of 3 seeds)", "GPT-2", "OPT", "Llama"],
                    [[title] + [cell(a) for a in ("gpt2", "opt", "llama")] for title, cell in rows])
