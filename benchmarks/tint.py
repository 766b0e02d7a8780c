"""TinT experiments with SmolLM2-135M as the auxiliary, sized for a 2-core CPU (wall times: docs/tint.md).

    python benchmarks/tint.py lm          # SQuAD paragraphs: perplexity of aux vs TinT vs dynamic evaluation
    python benchmarks/tint.py fewshot     # SST-2/MR/CR, 0 and 32 shots, 3 seeds: ICL vs TinT vs fine-tuning
    python benchmarks/tint.py speed       # time and peak memory: structured vs explicit vs fine-tuning
    python benchmarks/tint.py checks      # the numeric correctness report (tiny random models)
    python benchmarks/tint.py sizes       # parameter counts of every realization next to the reference's
    python benchmarks/tint.py compact     # the compact explicit network: build time, forward time, memory
    python benchmarks/tint.py agreement --dtype float64   # its predictions vs the structured rule's
    python benchmarks/tint.py tables [--update-docs]  # the markdown tables (written into docs/ and README)

Results go to benchmarks/results/tint_<part>.json (atomic writes; a rerun resumes from finished cells).
Cuts from the reference protocol (for the CPU budget) are listed in PROTOCOL and printed with the tables.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from hdopt.tint import TinTConfig, build
from hdopt.tint import evaluate as ev
from hdopt.tint.baselines import sgd_finetune
from hdopt.tint.data import TASKS, load_sentiment, squad_paragraphs
from hdopt.tint.results import read_json, write_json

sys.path.insert(0, str(Path(__file__).parent))
import tint_compact  # noqa: E402  (a sibling script: the compact network's benchmarks)

RESULTS = Path(__file__).parent / "results"
LRS = (1e-2, 1e-1)  # inner-lr grid, chosen on a dev split drawn from the training pool
PROTOCOL = {
    "aux": "smollm2-135m (float32)", "hardware": "2-core CPU, no GPU (shared)",
    "tint": "structured, backward='reference' (the paper's rule), top 3 layers, 1 step, mean loss",
    "ft": "explicit SGD with torch autograd on the same 3 layers, same lr rule, 1 step",
    "speed": "one process per cell (peak RSS above the loaded model); SmolLM2 contexts of 128/512 tokens +"
             " 32 query tokens; explicit vs structured on a tiny GPT-2 (width 16, 2 layers, T = 32)",
    "fewshot": "tasks sst2/mr/cr; 0 and 32 shots (16 per class, LM-BFF template '<x> It was great/terrible');"
               " 200 eval examples per task, as the reference (two batches of 100: the first drawn with"
               " Random(1234), the second with Random(4321) from the rest of the split); 3 seeds for 32"
               " shots; label-token loss for 32 shots, the query's own LM loss for 0 shots;"
               " lr per (task, shots, method) from"
               f" {list(LRS)} on 16 dev examples from the training pool (never the reported split);"
               " 0-shot fine-tuning (one run per test input) is computed by the exact-mode TinT, which"
               " equals autograd SGD to <= 3e-7 (tint_checks.json), to batch the runs",
    "lm": "24 SQuAD dev paragraphs of >= 128 tokens (reference: 1024-token chunks of larger corpora),"
          " truncated to 256 tokens, first half = context, second half scored; lr chosen on 6 other"
          " paragraphs",
}


def load_aux():
    from hdopt.lm.models import load_model

    return load_model("smollm2-135m")


def tint_for(model, lr: float):
    return build(model, TinTConfig(n_layers=3, n_steps=1, inner_lr=lr, backward="reference"))


# ---------------------------------------------------------------- language modelling
def run_lm(n_eval: int = 24, n_dev: int = 6, max_tokens: int = 256) -> dict:
    model, tok = load_aux()
    paras = [tok(p).input_ids[:max_tokens] for p in squad_paragraphs()]
    paras = [p for p in paras if len(p) >= 128]
    dev, test = paras[-n_dev:], paras[:n_eval]  # different articles: the file is ordered by article
    tint = tint_for(model, LRS[0])
    dev_ppl = {lr: ev.perplexity([ev.continuation_nll("ft", model, ev.with_lr(tint, lr), p, len(p) // 2)
                                  for p in dev]) for lr in LRS}
    lr = min(dev_ppl, key=dev_ppl.get)  # dynamic evaluation's best lr, used for TinT too ("same lr")
    tint = ev.with_lr(tint, lr)
    out = {"lr": lr, "dev_ppl": {str(k): v for k, v in dev_ppl.items()}, "n_eval": len(test)}
    for method in ev.METHODS:
        t0 = time.time()
        out[method] = ev.perplexity([ev.continuation_nll(method, model, tint, p, len(p) // 2) for p in test])
        out[f"{method}_seconds"] = time.time() - t0
        print(f"lm {method}: ppl {out[method]:.3f}", flush=True)
    write_json(RESULTS / "tint_lm.json", {"protocol": PROTOCOL, "results": out})
    return out


# ---------------------------------------------------------------- few-shot classification
def run_fewshot(n_eval: int = 100, n_dev: int = 16, seeds=(0, 1, 2), tasks=TASKS,
                shots_list=(32, 0), batches: int = 2) -> dict:
    """One results file per task, so ``fewshot --tasks mr`` and ``--tasks cr`` can run in parallel.

    ``batches`` evaluation batches of ``n_eval`` examples each: batch 1 is drawn with Random(1234) (before the
    dev examples, so it and the chosen lrs do not depend on ``batches``), batch b > 1 from the rest of the
    reported split with Random(4321); cells of batch b > 1 are keyed ``.../method#b``.
    """
    model, tok = load_aux()
    base = tint_for(model, LRS[0])
    for shots in shots_list:  # 32 shots first: the main comparison
        for task in tasks:
            path = RESULTS / f"tint_fewshot_{task}.json"
            saved = read_json(path, {"cells": {}})
            saved["protocol"] = PROTOCOL  # the current protocol, also in a file begun by an older run
            cells = saved["cells"]
            pool, reported = load_sentiment(task)
            rng = random.Random(1234)
            tests = rng.sample(reported, n_eval)
            dev = rng.sample(pool, n_dev)
            demo_pool = [e for e in pool if e not in dev]
            rest = [e for e in reported if e not in tests]
            extra = random.Random(4321).sample(rest, n_eval * (batches - 1))
            evals = [(tests, "")] + [(extra[(b - 1) * n_eval:b * n_eval], f"#{b + 1}")
                                     for b in range(1, batches)]
            lrs = _choose_lrs(cells, task, shots, model, tok, base, demo_pool, dev, path, saved)
            for seed in (seeds if shots else (0,)):
                for batch, tag in evals:
                    todo = [m for m in ev.METHODS if f"{task}/{shots}/{seed}/{m}{tag}" not in cells]
                    if not todo:
                        continue
                    demos = ev.sample_demos(demo_pool, shots, seed) if shots else []
                    t0 = time.time()
                    runs = {m: _run(m, model, base, lrs[m], shots) for m in todo}
                    accs = ev.classify_many(runs, model, tok, demos, batch)
                    for m, acc in accs.items():
                        cells[f"{task}/{shots}/{seed}/{m}{tag}"] = {"acc": acc, "lr": lrs[m], "n": len(batch),
                                                                    "seconds_all_methods": time.time() - t0}
                        print(f"{task}/{shots}/{seed}/{m}{tag}: acc {acc:.3f} (lr {lrs[m]})", flush=True)
                    write_json(path, saved)
    return {}


def _run(method: str, model, base, lr: float, shots: int):
    """(method, TinT) for classify_many; 0-shot fine-tuning (100 separate runs) goes through the exact
    TinT, which equals autograd SGD (tint_checks.json), so that the runs are batched."""
    tint = ev.with_lr(base, lr)
    if method == "ft" and not shots:
        cfg = {**tint.config.to_dict(), "backward": "exact", "attn_score_grad": None,
               "update_norm_gain": None}
        return "tint", build(model, TinTConfig(**cfg))
    return method, tint


def _choose_lrs(cells, task, shots, model, tok, base, demo_pool, dev, path, saved) -> dict:
    """Inner lr per method with the best dev accuracy (demos from seed 100; dev drawn from the training
    pool, never the reported split); ties go to the smaller lr."""
    key = f"{task}/{shots}/dev"
    if key not in cells:
        demos = ev.sample_demos(demo_pool, shots, 100) if shots else []
        runs = {f"{m}@{lr}": _run(m, model, base, lr, shots) for m in ("tint", "ft") for lr in LRS}
        cells[key] = ev.classify_many(runs, model, tok, demos, dev)
        print(f"{key}: {cells[key]}", flush=True)
        write_json(path, saved)
    accs = cells[key]
    best = {m: max(LRS, key=lambda lr, m=m: (accs[f"{m}@{lr}"], -lr)) for m in ("tint", "ft")}
    return {"icl": 0.0, **best}


# ---------------------------------------------------------------- speed and memory
SPEED_CELLS = [("smollm2", kind, T) for T in (128, 512) for kind in ("aux", "structured", "ft")]
SPEED_CELLS += [("tiny-gpt2", kind, 32) for kind in ("aux", "structured", "explicit")]


def speed_one(model_name: str, kind: str, T: int, repeats: int = 3) -> dict:
    """Median seconds and peak extra RSS of one TinT forward (or a baseline) on [context (T) | query (32)]."""
    import resource

    if model_name == "smollm2":
        model, _ = load_aux()
        tint = tint_for(model, 1e-4)
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        gpt2 = GPT2Config(vocab_size=61, n_positions=64, n_embd=16, n_layer=2, n_head=2)
        model = GPT2LMHeadModel(gpt2).eval()
        cfg = TinTConfig(n_layers=2, n_steps=1, inner_lr=1e-4, backward="reference", max_len=T + 32)
        tint = build(model, cfg)
        if kind == "explicit":
            tint = build(model, TinTConfig(**{**cfg.to_dict(), "realization": "explicit"}))
    V = model.config.vocab_size
    ids = torch.randint(0, V, (1, T + 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # page in memory-mapped weights so that they do not count as the op's memory
        sum(float(p.sum()) for p in model.parameters())
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        if kind == "aux":
            with torch.no_grad():
                model(input_ids=ids)
        elif kind == "ft":
            ctx = ids[:, :T]
            top, _ = sgd_finetune(model, ctx, torch.ones_like(ctx, dtype=torch.bool), 3, 1, 1e-4)
            tint.run(ids, tint.blocks_with(top), logits_from=T - 1)
        else:
            tint(ids, context_len=T)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params = tint.num_parameters() if kind != "aux" else sum(p.numel() for p in model.parameters())
    return {"model": model_name, "kind": kind, "T": T, "seconds": statistics.median(times),
            "peak_extra_mb": (peak - base) / 1024, "params": params}


def run_speed() -> dict:
    """Each cell in a fresh process so that peak memory is its own."""
    import json
    import subprocess

    out = []
    for model_name, kind, T in SPEED_CELLS:
        cmd = [sys.executable, __file__, "_speed_one", model_name, kind, str(T)]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        out.append(json.loads(line))
        print(out[-1], flush=True)
    write_json(RESULTS / "tint_speed.json", {"protocol": PROTOCOL, "cells": out})
    return {"cells": out}


# ---------------------------------------------------------------- tables
def tables() -> str:
    return "\n\n".join(block for block in tables_by_name().values() if block)


def tables_by_name() -> dict[str, str]:
    """Every TinT table (markdown), by the name of its block in docs/tint.md."""
    blocks = {"checks": _checks_markdown(), "lm": _lm_markdown(), "speed": _speed_markdown(),
              "fewshot": _fewshot_markdown(), "fewshot_seeds": _fewshot_seeds_markdown(),
              "sizes": tint_compact.sizes_markdown(), "compact_speed": tint_compact.speed_markdown(),
              "agreement": tint_compact.agreement_markdown(),
              "compact_checks": tint_compact.checks_markdown()}
    return {name: "\n".join(lines) for name, lines in blocks.items()}


CHECK_ROWS = [  # (row title, key in tint_checks.json; "{arch}" is filled in)
    ("first pass vs HF model, float32 (<= 1e-6)", "first_pass_fp32/{arch}"),
    ("exact mode vs HF autograd + `torch.optim.SGD`, float64, 1 step sum (<= 1e-6)",
     "exact_vs_sgd_fp64/{arch}/1step_sum"),
    ("same, 2 steps, mean loss (<= 1e-6)", "exact_vs_sgd_fp64/{arch}/2step_mean"),
    ("exact mode vs autograd SGD on our float64 functional forward",
     "exact_vs_autograd_functional_fp64/{arch}"),
    ("reference mode vs autograd of the same rule, float64, N = 1000 (<= 1e-3)",
     "reference_vs_rule_fp64/{arch}"),
    ("same, float32", "reference_vs_rule_fp32/{arch}"),
    ("gap between the reference rule and exact SGD (not an error: what the rule gives up)",
     "rule_vs_exact_sgd_gap/{arch}"),
    ("effect of the reference code's x4 MLP-output bias step on the change", "x4_bias_defect_effect/{arch}"),
    ("unpacked explicit vs structured, float64, 1 step sum (<= 1e-6; width 8, 2 blocks)",
     "explicit_vs_structured_fp64/{arch}/1step_sum"),
    ("same, 2 steps mean", "explicit_vs_structured_fp64/{arch}/2step_mean")]


def _checks_markdown() -> list[str]:
    saved = read_json(RESULTS / "tint_checks.json")
    if not saved:
        return []
    archs = ("gpt2", "opt", "llama")
    rows = [[title] + [f"{saved[key.format(arch=a)]:.1e}" if key.format(arch=a) in saved else "-"
                       for a in archs] for title, key in CHECK_ROWS]
    return tint_compact.md_table(["check (relative error, worst of 3 seeds)", "GPT-2", "OPT", "Llama"],
                                 rows)


def _lm_markdown() -> list[str]:
    lm = read_json(RESULTS / "tint_lm.json")
    if not lm:
        return []
    r = lm["results"]
    return ["| model | perplexity of the continuation | seconds (24 paragraphs) |", "|---|---|---|",
            f"| auxiliary (no update) | {r['icl']:.2f} | {r['icl_seconds']:.0f} |",
            f"| TinT, reference rule, 1 step on the context (structured, float32) | {r['tint']:.2f} | "
            f"{r['tint_seconds']:.0f} |",
            f"| explicit dynamic evaluation (autograd SGD, same lr {r['lr']:g}) | {r['ft']:.2f} | "
            f"{r['ft_seconds']:.0f} |"]


def _speed_markdown() -> list[str]:
    sp = read_json(RESULTS / "tint_speed.json")
    if not sp:
        return []
    out = ["| auxiliary | context T (+32 query) | computation | seconds | peak extra RSS (MB) | parameters |",
           "|---|---|---|---|---|---|"]
    names = {"aux": "auxiliary forward (no update)", "structured": "TinT, structured",
             "explicit": "TinT, unpacked explicit", "ft": "explicit fine-tuning (autograd) + forward"}
    for c in sp["cells"]:
        out.append(f"| {c['model']} | {c['T']} | {names[c['kind']]} | {c['seconds']:.3g} | "
                   f"{c['peak_extra_mb']:.0f} | {c['params']:,} |")
    return out


def _fewshot_cells() -> dict:
    return {k: v for task in TASKS for k, v in read_json(RESULTS / f"tint_fewshot_{task}.json",
                                                          {"cells": {}})["cells"].items()}


def _fewshot_markdown() -> list[str]:
    cells = _fewshot_cells()
    if not cells:
        return []
    out = ["| task | shots | eval examples | ICL | TinT (structured, float32) | fine-tuning (autograd SGD) |"
           " lr TinT / FT (chosen on dev) |", "|---|---|---|---|---|---|---|"]
    for task in TASKS:
        for shots in (0, 32):
            row = [_acc(cells, task, shots, m) for m in ev.METHODS]
            lrs = [_lr(cells, task, shots, m) for m in ("tint", "ft")]
            out.append(f"| {TASK_NAMES[task]} | {shots} | {_n_eval(cells, task, shots)} | " + " | ".join(row)
                       + f" | {lrs[0]} / {lrs[1]} |")
    return out


def _fewshot_seeds_markdown() -> list[str]:
    """Every seed of every task: accuracy (%) per demonstration seed, each on all evaluation examples."""
    cells = _fewshot_cells()
    if not cells:
        return []
    out = ["| task | shots | method | seed 0 | seed 1 | seed 2 | mean ± std | TinT - ICL per seed |",
           "|---|---|---|---|---|---|---|---|"]
    for task in TASKS:
        for shots in (0, 32):
            icl = _accs(cells, task, shots, "icl")
            for method in ev.METHODS:
                accs = _accs(cells, task, shots, method)
                seeds = [f"{100 * a:.1f}" for a in accs] + ["n/a" if shots == 0 else "-"] * (3 - len(accs))
                gain = ", ".join(f"{100 * (t - i):+.1f}" for t, i in zip(accs, icl, strict=True)) \
                    if method == "tint" else ""
                out.append(f"| {TASK_NAMES[task]} | {shots} | {METHOD_NAMES[method]} | "
                           + " | ".join(seeds[:3]) + f" | {_acc(cells, task, shots, method)} | {gain} |")
    return out


TASK_NAMES = {"sst2": "SST-2", "mr": "MR", "cr": "CR"}
METHOD_NAMES = {"icl": "ICL", "tint": "TinT", "ft": "fine-tuning"}


def _accs(cells, task, shots, method):
    """Accuracy per demonstration seed over all evaluation batches of that seed (weighted by batch size)."""
    prefix, per_seed = f"{task}/{shots}/", {}
    for k, v in cells.items():
        parts = k.split("/")
        if k.startswith(prefix) and len(parts) == 4 and parts[3].split("#")[0] == method and "acc" in v:
            per_seed.setdefault(parts[2], []).append((v["acc"], v.get("n", 100)))
    return [sum(a * n for a, n in runs) / sum(n for _, n in runs) for _, runs in sorted(per_seed.items())]


def _n_eval(cells, task, shots) -> int:
    """Evaluation examples behind each accuracy of (task, shots) (the first seed's ICL batches)."""
    return sum(v.get("n", 100) for k, v in cells.items()
               if k.startswith(f"{task}/{shots}/0/icl") and "acc" in v)


def _acc(cells, task, shots, method) -> str:
    a = _accs(cells, task, shots, method)
    if not a:
        return "-"
    sd = statistics.pstdev(a) if len(a) > 1 else 0.0
    return f"{100 * statistics.mean(a):.1f} ± {100 * sd:.1f}" if len(a) > 1 else f"{100 * a[0]:.1f}"


def _lr(cells, task, shots, method) -> str:
    v = [c["lr"] for k, c in cells.items() if k.startswith(f"{task}/{shots}/") and "lr" in c
         and k.split("/")[-1].split("#")[0] == method]
    return f"{v[0]:g}" if v else "-"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if argv is None and len(sys.argv) == 5 and sys.argv[1] in ("_speed_one", "_compact_one"):  # workers
        import json

        torch.set_num_threads(1)
        one = speed_one if sys.argv[1] == "_speed_one" else tint_compact.speed_one
        print(json.dumps(one(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
        return 0
    parser.add_argument("part", choices=["checks", "lm", "fewshot", "speed", "sizes", "compact", "agreement",
                                         "tables", "all"])
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=None,
                        help="tasks (default: all; agreement: sst2 cr)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64",
                        help="agreement: precision of the compact network")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="agreement: demonstration seeds")
    parser.add_argument("--update-docs", action="store_true",
                        help="tables: also write them into docs/tint.md and the README's TinT row")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.part in ("checks", "all"):
        from hdopt.tint.checks import report

        write_json(RESULTS / "tint_checks.json", report())
        tint_compact.run_checks()
    if args.part in ("lm", "all"):
        run_lm()
    if args.part in ("fewshot", "all"):
        run_fewshot(tasks=args.tasks or TASKS)
    if args.part in ("speed", "all"):
        run_speed()
    if args.part in ("sizes", "all"):
        tint_compact.run_sizes()
    if args.part in ("compact", "all"):
        tint_compact.run_speed()
    if args.part in ("agreement", "all"):
        tint_compact.run_agreement(args.tasks or ("sst2", "cr"), args.dtype, tuple(args.seeds))
    print(tables())
    if args.update_docs:
        import tint_docs

        tint_docs.update(tables_by_name(), lambda task, shots, m: _accs(_fewshot_cells(), task, shots, m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
