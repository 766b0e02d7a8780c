"""Numerical checks of the compact TinT against the structured realization, on tiny random auxiliaries.

Relative Frobenius errors of the logit change (after minus before the simulated steps), worst over seeds:
float64 agreement (1 step sum, 2 steps mean), the sliced executor against each module's dense forward, and in
float32 and bfloat16 the error of each realization against the float64 rule (the rule's finite difference
multiplies rounding by N = 1000, so low precision is bounded by that, not by the construction; in bfloat16
the simulated update is lost). ``python -m
hdopt.tint.compact.checks`` prints the report; tests/tint/test_compact.py asserts the same quantities.
"""

from __future__ import annotations

import json

import torch

from hdopt.tint import TinTConfig, build, from_hf
from hdopt.tint.checks import random_ids, rel, tiny_model
from hdopt.tint.compact import compact_tint


def _small(arch: str, seed: int, dtype: torch.dtype):
    extra = {"heads": 2, "kv_heads": 1, "tied": False} if arch == "llama" else {}
    return tiny_model(arch, dtype, seed=seed, layers=2, width=8, vocab=23, **extra)


def report(seeds=(0, 1, 2), low_precision: bool = True) -> dict:
    """Worst case over seeds of every check; ``low_precision``: also the float32 / bfloat16 errors."""
    out: dict = {}

    def worst(key: str, value: float) -> None:
        out[key] = max(out.get(key, 0.0), value)

    for seed in seeds:
        ids = random_ids(1, 9, seed=seed + 1) % 23
        for arch in ("gpt2", "opt", "llama"):
            m64 = _small(arch, seed, torch.float64)
            for steps, red in ((1, "sum"), (2, "mean")):
                cfg = TinTConfig(n_layers=2, n_steps=steps, inner_lr=0.01, reduction=red,
                                 backward="reference", max_len=10)
                s, c = build(m64, cfg), compact_tint(from_hf(m64), cfg)
                before = s.run(ids, s.blocks_with(None), logits_from=5)[0]
                want, got = s(ids, context_len=6).query_logits, c(ids, context_len=6).query_logits
                key = f"{steps}step_{red}"
                worst(f"compact_vs_structured_fp64/{arch}/{key}", rel(got - before, want - before))
                dense = c(ids, context_len=6, dense=True).query_logits
                worst(f"sliced_vs_dense_fp64/{arch}/{key}", rel(got - before, dense - before))
            cfg = TinTConfig(n_layers=2, n_steps=1, inner_lr=0.01, reduction="sum", backward="reference",
                             max_len=10)
            s64 = build(m64, cfg)
            before = s64.run(ids, s64.blocks_with(None), logits_from=5)[0]
            rule = s64(ids, context_len=6).query_logits - before
            for short, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)) if low_precision else ():
                spec = from_hf(m64).to(dtype)
                for name, tint in (("compact", compact_tint(spec, cfg)), ("structured", build(spec, cfg))):
                    got = tint(ids, context_len=6).query_logits.double() - before
                    worst(f"{name}_{short}_vs_fp64_rule/{arch}", rel(got, rule))
    return out


if __name__ == "__main__":
    print(json.dumps(report(), indent=1))
