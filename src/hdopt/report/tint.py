"""Report section 4: TinT, a transformer whose forward pass fine-tunes a smaller one inside it."""

from __future__ import annotations

import random
import statistics

from hdopt.lm.models import load_model
from hdopt.report.claims import Claim, Section, Table, fmt, verdict_from
from hdopt.report.context import Context
from hdopt.report.plots import grouped_bars
from hdopt.tint import TinTConfig, build, checks
from hdopt.tint import evaluate as ev
from hdopt.tint.compact import checks as compact_checks
from hdopt.tint.data import load_sentiment

LRS = (1e-2, 1e-1)  # inner-lr candidates, chosen on a dev split drawn from the training pool
LAYERS, STEPS = 3, 1
TEST_SEED, DEV_SEED = 1234, 4321  # the test draw is hdopt tint eval's
TOLERANCES = {"exact_vs_sgd_fp64": 1e-6, "reference_vs_rule_fp64": 1e-3, "explicit_vs_structured_fp64": 1e-6,
              "compact_vs_structured_fp64": 1e-10}
CHECK_NAMES = {
    "exact_vs_sgd_fp64": "exact mode vs autograd SGD (float64)",
    "reference_vs_rule_fp64": "reference rule vs autograd of the same rule (float64)",
    "explicit_vs_structured_fp64": "unpacked explicit network vs structured realization (float64)",
    "compact_vs_structured_fp64": "compact explicit network (the one that runs at full size) vs structured "
                                  "realization (float64)",
}


def agreement_claim(ctx: Context) -> Claim:
    """Simulated fine-tuning inside one forward pass vs explicit gradient steps, on tiny random models."""
    report = {**checks.report(seeds=ctx.budget.tint_check_seeds),
              **compact_checks.report(seeds=ctx.budget.tint_check_seeds, low_precision=False)}
    worst = {key: max(v for k, v in report.items() if k.startswith(key + "/")) for key in TOLERANCES}
    rows = [[CHECK_NAMES[k], fmt(worst[k]), f"<= {TOLERANCES[k]:g}",
             "yes" if worst[k] <= TOLERANCES[k] else "no"]
            for k in TOLERANCES]  # fmt: skip
    per_arch = [[k, fmt(v)] for k, v in sorted(report.items())]
    ok = [worst[k] <= TOLERANCES[k] for k in TOLERANCES]
    return Claim(
        title="One forward pass simulates a fine-tuning step",
        claim="A TinT's forward pass over [context | query] gives the query logits of the auxiliary model "
              "after gradient steps on the context, as an explicit fine-tuning step would.",
        paper="reference TinT vs an autograd implementation of its own approximate rule: relative error of "
              "the logit change 2.7e-4 (float64), 3.4e-3 (float32), tiny random GPT-2",
        measured="; ".join(f"{CHECK_NAMES[k]}: {fmt(worst[k])}" for k in TOLERANCES)
        + " (worst over GPT-2, OPT and Llama-style tiny models and seeds)",
        verdict=verdict_from(all(ok), any(ok)),
        why="reproduced when every relative error is within hdopt.tint's tolerance (table)",
        command="PYTHONPATH=src python benchmarks/tint.py checks",
        tables=[Table(["check", "worst relative error", "tolerance", "ok"], rows),
                Table(["check / architecture", "relative error"], per_arch)],
    )  # fmt: skip


def _choose_lr(model, tok, base, pool, shots: int, n_dev: int, seed: int) -> dict[str, float]:
    """Inner lr for TinT and explicit fine-tuning: best dev accuracy (dev and its demos from the pool)."""
    dev = random.Random(DEV_SEED).sample(pool, n_dev)
    rest = [e for e in pool if e not in dev]
    demos = ev.sample_demos(rest, shots, seed + 100)
    runs = {f"{m}@{lr}": (m, ev.with_lr(base, lr)) for m in ("tint", "ft") for lr in LRS}
    accs = ev.classify_many(runs, model, tok, demos, dev)
    return {m: max(LRS, key=lambda lr, m=m: (accs[f"{m}@{lr}"], -lr)) for m in ("tint", "ft")}


def icl_vs_tint(ctx: Context, progress=None) -> Claim:
    """Few-shot accuracy of ICL, TinT and explicit one-step fine-tuning on the same demonstrations."""
    b = ctx.budget
    model, tok = load_model(ctx.model)
    base = build(model, TinTConfig(n_layers=LAYERS, n_steps=STEPS, inner_lr=LRS[0], backward="reference"))
    cells: dict[str, dict[str, list[float]]] = {}
    lrs: dict[str, dict[str, float]] = {}
    for task in b.tint_tasks:
        if progress:
            progress(f"TinT: {task}")
        pool, reported = load_sentiment(task, ctx.data_dir)
        tests = random.Random(TEST_SEED).sample(reported, min(b.tint_eval, len(reported)))
        lrs[task] = _choose_lr(model, tok, base, pool, b.tint_shots, b.tint_dev, ctx.seed)
        runs = {"icl": ("icl", base), **{m: (m, ev.with_lr(base, lrs[task][m])) for m in ("tint", "ft")}}
        cells[task] = {m: [] for m in runs}
        for seed in b.tint_seeds:
            demos = ev.sample_demos(pool, b.tint_shots, seed)
            for m, acc in ev.classify_many(runs, model, tok, demos, tests).items():
                cells[task][m].append(100 * acc)
    mean = {t: {m: statistics.mean(v) for m, v in c.items()} for t, c in cells.items()}
    gain = statistics.mean(mean[t]["tint"] - mean[t]["icl"] for t in mean)
    rows = [[t, f"{mean[t]['icl']:.1f}", f"{mean[t]['tint']:.1f}", f"{mean[t]['ft']:.1f}",
             fmt(lrs[t]["tint"]),
             fmt(lrs[t]["ft"])] for t in mean]  # fmt: skip
    plot = grouped_bars(
        {t: {"ICL": m["icl"], "TinT": m["tint"], "fine-tuning": m["ft"]} for t, m in mean.items()},
        "accuracy (%)",
        f"{b.tint_shots}-shot accuracy",
        ctx.section_dir("tint") / "fewshot.png",
    )
    commands = [
        f"hdopt tint eval --aux {ctx.model} --task {t} --shots {b.tint_shots} --layers {LAYERS} --steps "
        f"{STEPS} --method {m} --inner-lr {lrs[t].get(m, LRS[0]):g} --num-eval {b.tint_eval} --seed {s}"
        f"{ctx.data_flag()}"
        for t in mean
        for m in ("icl", "tint", "ft")
        for s in b.tint_seeds
    ]
    return Claim(
        title="TinT improves on in-context learning",
        claim="Simulating one step of fine-tuning on the demonstrations inside the forward pass beats plain "
              "in-context learning, about as much as explicit one-step fine-tuning does. (TinT numbers here: "
              "the structured realization of the paper's rule, float32; `hdopt tint eval --realization "
              "explicit` computes them by the compact TinT network's own forward pass.)",
        paper="OPT-125M auxiliary, one step: TinT improves few-shot accuracy by 4-16% absolute on average, "
              "comparable to explicit one-step fine-tuning",
        measured=f"mean TinT - ICL = {gain:+.1f} points over {', '.join(mean)} ({b.tint_shots} shots, "
                 f"{b.tint_eval} test examples, {len(b.tint_seeds)} seed(s); per task: "
                 + ", ".join(f"{t} {mean[t]['tint'] - mean[t]['icl']:+.1f}" for t in mean) + ")",
        verdict=verdict_from(gain >= 4.0, gain > 0),
        why="reproduced when TinT beats ICL by >= 4 points on average (the paper's lower end); "
        "partly when by "
            f"less. Inner lr per method chosen from {list(LRS)} on {b.tint_dev} dev examples from "
        "the training "
            "pool, never on the reported split",
        command=" ; ".join(commands),
        tables=[Table(["task", "ICL", "TinT", "explicit fine-tuning", "TinT lr", "fine-tuning lr"], rows)],
        plots=[ctx.rel(plot)],
    )  # fmt: skip


def tint(ctx: Context, progress=None) -> Section:
    """Section 4: agreement with explicit fine-tuning, then ICL vs TinT accuracy."""
    if progress:
        progress("TinT: agreement checks")
    claims = [agreement_claim(ctx), icl_vs_tint(ctx, progress)]
    return Section("tint", "In-context fine-tuning (TinT)",
                   f"TinT with {ctx.model} as the auxiliary, computed by the structured realization (index/"
                   f"einsum ops, float32): the top {LAYERS} blocks take {STEPS} SGD "
                   "step(s) on the demonstrations' label tokens with the paper's approximate backward rule. "
                   "Agreement checks run on tiny random GPT-2, OPT and Llama-style models, including the "
                   "compact explicit network against the structured realization; its agreement on SmolLM2 "
                   "itself is measured by benchmarks/tint.py agreement (docs/tint.md).",
                   claims, ctx.scale, ctx.settings())  # fmt: skip
