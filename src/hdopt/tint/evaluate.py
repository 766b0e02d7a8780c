"""The TinT experiments as small functions: few-shot sentiment classification and language modelling.

Methods compared (same auxiliary model, same data):
* ``icl``: in-context learning (the demonstrations are only context);
* ``tint``: a TinT forward pass (simulated SGD on the demonstrations, then the query with the demonstrations
  in context), by the structured realization (:func:`label_logits_many`) or by the compact explicit network's
  own forward pass (:func:`compact_label_logits`);
* ``ft``: explicit fine-tuning with torch autograd (:func:`hdopt.tint.baselines.sgd_finetune`), same rule.
With 0 shots the context is the test input itself (TinT and FT take one step on its language-modelling loss).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from hdopt.tint.baselines import sgd_finetune
from hdopt.tint.compact import CompactTinT
from hdopt.tint.config import TinTConfig
from hdopt.tint.data import Example
from hdopt.tint.structured import StructuredTinT

METHODS = ("icl", "tint", "ft")
LABEL_WORDS = (" terrible", " great")  # LM-BFF's words for SST-2 / MR / CR


@dataclass
class Prompt:
    """Token ids of a context (demonstrations) and the positions of their label tokens."""

    ids: list[int]
    label_positions: list[int]


def label_ids(tokenizer) -> list[int]:
    ids = [tokenizer(w, add_special_tokens=False).input_ids for w in LABEL_WORDS]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"label words {LABEL_WORDS} must be single tokens for this tokenizer")
    return [i[0] for i in ids]


def query_ids(tokenizer, sentence: str) -> list[int]:
    """``<sentence> It was`` (the model's next token is scored on the label words)."""
    return tokenizer(f"{sentence} It was", add_special_tokens=False).input_ids


def build_prompt(tokenizer, demos: list[Example]) -> Prompt:
    """Concatenated demonstrations ``<sentence> It was <label>.\\n`` with their label-token positions."""
    words, sep = label_ids(tokenizer), tokenizer(".\n", add_special_tokens=False).input_ids
    ids: list[int] = []
    positions = []
    for sentence, label in demos:
        ids += query_ids(tokenizer, sentence)
        positions.append(len(ids))
        ids += [words[label]] + sep
    return Prompt(ids, positions)


def sample_demos(pool: list[Example], shots: int, seed: int) -> list[Example]:
    """``shots`` demonstrations, balanced over the two labels, in a seeded random order."""
    rng = random.Random(seed)
    per = [[e for e in pool if e[1] == y] for y in (0, 1)]
    demos = rng.sample(per[0], shots // 2) + rng.sample(per[1], shots - shots // 2)
    rng.shuffle(demos)
    return demos


def _pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids and the (B, T) mask of real tokens."""
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    return ids, mask


def _targets(T: int, positions: list[int]) -> torch.Tensor:
    t = torch.zeros(1, T, dtype=torch.bool)
    t[0, positions] = True
    return t


def classify(method: str, model, tokenizer, tint: StructuredTinT, demos: list[Example],
             tests: list[Example]) -> float:
    """Accuracy of ``method`` on ``tests`` with ``demos`` (possibly none) as demonstrations."""
    return classify_many({method: (method, tint)}, model, tokenizer, demos, tests)[method]


def classify_many(runs: dict[str, tuple[str, StructuredTinT]], model, tokenizer, demos: list[Example],
                  tests: list[Example], batch: int = 32) -> dict[str, float]:
    """Accuracies of several (method, TinT) runs on the same data, e.g. lr candidates
    (see :func:`label_logits_many`)."""
    labels = torch.tensor([y for _, y in tests])
    logits = label_logits_many(runs, model, tokenizer, demos, tests, batch)
    return {name: accuracy(lg, labels) for name, lg in logits.items()}


def accuracy(label_logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows of (n, 2) label-word logits whose larger entry is the label."""
    return float((label_logits.argmax(-1) == labels).float().mean())


def label_logits_many(runs: dict[str, tuple[str, StructuredTinT]], model, tokenizer, demos: list[Example],
                      tests: list[Example], batch: int = 32) -> dict[str, torch.Tensor]:
    """(n, 2) logits of the two label words at each test query, for several (method, TinT) runs.

    The frozen blocks below the simulated ones are the same for every run, so their outputs (context and
    queries) are computed once; each run then only pays for its adaptation and its top blocks.
    All TinTs must share the auxiliary and ``n_layers``.
    """
    for name, (method, _) in runs.items():
        if method not in METHODS:
            raise ValueError(f"{name}: unknown method {method!r}; choose from {METHODS}")
    base = next(iter(runs.values()))[1]
    words = label_ids(tokenizer)
    queries = [query_ids(tokenizer, s) for s, _ in tests]
    if not demos:  # 0 shots: adapt to each query itself (one fine-tuned copy per query: small batches)
        parts = {name: [] for name in runs}
        for i in range(0, len(queries), 8):
            for name, lg in _zero_shot(runs, model, base, queries[i:i + 8], words).items():
                parts[name].append(lg)
        return {name: torch.cat(lg) for name, lg in parts.items()}
    prompt = build_prompt(tokenizer, demos)
    ctx = torch.tensor([prompt.ids])
    targets = _targets(ctx.shape[1], prompt.label_positions)  # label-token-only loss
    h_ctx, low_past = base.lower(ctx, want_cache=True)
    batches = []  # (lower output of the queries (B, Tq, D), index of each query's last token)
    for i in range(0, len(queries), batch):
        ids, mask = _pad(queries[i:i + batch])
        batches.append((base.lower(ids, past=low_past)[0], mask.sum(1) - 1))
    out = {}
    for name, (method, tint) in runs.items():
        cfg, top = tint.config, None
        if method == "tint":
            top, _ = tint.adapt(ctx, targets, hidden=h_ctx)
        elif method == "ft":
            top, _ = sgd_finetune(model, ctx, targets, cfg.n_layers, cfg.n_steps, cfg.inner_lr, cfg.reduction)
        _, top_past = tint.upper(h_ctx, top, logits_from=ctx.shape[1] - 1, want_cache=True)
        out[name] = torch.cat([tint.upper(h, top, past=top_past, positions=last)[0][:, 0, words]
                               for h, last in batches])
    return out


def compact_label_logits(net: CompactTinT, tokenizer, demos: list[Example], tests: list[Example],
                         batch: int = 25) -> torch.Tensor:
    """(n, 2) label-word logits from the compact TinT network's own forward pass.

    With demonstrations, ``batch`` queries share one pass (:meth:`CompactTinT.packed_logits`: each sees the
    demonstrations and itself); with none, each query is its own context (one pass per query).
    """
    words = label_ids(tokenizer)
    queries = [query_ids(tokenizer, s) for s, _ in tests]
    if not demos:
        return torch.stack([net(torch.tensor([q]), context_len=len(q)).query_logits[0, -1, words]
                            for q in queries])
    prompt = build_prompt(tokenizer, demos)
    return torch.cat([net.packed_logits(prompt.ids, prompt.label_positions, queries[i:i + batch])[:, words]
                      for i in range(0, len(queries), batch)])


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """How two (n, 2) label-logit tables agree: prediction agreement rate, largest |logit difference|, and the
    smallest margin |l_1 - l_0| of either (a disagreement needs a margin below the logit difference)."""
    return {"agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
            "max_abs_logit_diff": float((a.double() - b.double()).abs().max()),
            "min_margin": float(torch.cat([(t[:, 1] - t[:, 0]).abs() for t in (a, b)]).min())}


def _zero_shot(runs, model, base: StructuredTinT, queries: list[list[int]], words) -> dict[str, torch.Tensor]:
    """0 shots: ICL scores the bare query; TinT/FT first take steps on the query's own LM loss."""
    ids, mask = _pad(queries)
    last = mask.sum(1) - 1
    h = base.lower(ids, key_mask=mask)[0]
    out = {}
    for name, (method, tint) in runs.items():
        if method == "icl":
            top = None
        elif method == "tint":
            top, _ = tint.adapt(ids, key_mask=mask, hidden=h)  # one simulated fine-tuning per query
        else:
            out[name] = _zero_shot_ft(model, tint, queries, words)
            continue
        out[name] = tint.upper(h, top, positions=last)[0][:, 0, words]
    return out


def _zero_shot_ft(model, tint: StructuredTinT, queries: list[list[int]], words) -> torch.Tensor:
    cfg, out = tint.config, []
    for q in queries:
        ids = torch.tensor([q])
        targets = torch.ones_like(ids, dtype=torch.bool)
        top, _ = sgd_finetune(model, ids, targets, cfg.n_layers, cfg.n_steps, cfg.inner_lr, cfg.reduction)
        logits, _ = tint.run(ids, tint.blocks_with(top), positions=ids.new_tensor([len(q) - 1]))
        out.append(logits[:, 0, words])
    return torch.cat(out)


def continuation_nll(method: str, model, tint: StructuredTinT, ids: list[int],
                     n_ctx: int) -> tuple[float, int]:
    """Summed NLL (nats) of tokens ``ids[n_ctx:]`` given the context ``ids[:n_ctx]`` after adapting to it.

    ``icl`` = the plain auxiliary; ``tint`` = one TinT forward pass; ``ft`` = dynamic evaluation (SGD on the
    context's LM loss with autograd, then scoring).
    """
    x = torch.tensor([ids])
    if method == "tint":
        logits = tint(x, context_len=n_ctx).query_logits[:, :-1]
    else:
        top = None
        if method == "ft":
            cfg, ctx = tint.config, x[:, :n_ctx]
            targets = torch.ones_like(ctx, dtype=torch.bool)
            top, _ = sgd_finetune(model, ctx, targets, cfg.n_layers, cfg.n_steps, cfg.inner_lr, cfg.reduction)
        logits, _ = tint.run(x, tint.blocks_with(top), logits_from=n_ctx - 1)
        logits = logits[:, :-1]
    logp = torch.log_softmax(logits.double(), -1)[0]
    nll = -logp.gather(-1, x[0, n_ctx:, None]).sum()
    return float(nll), len(ids) - n_ctx


def perplexity(nll_and_counts: list[tuple[float, int]]) -> float:
    return math.exp(sum(n for n, _ in nll_and_counts) / sum(c for _, c in nll_and_counts))


def with_lr(tint: StructuredTinT, lr: float) -> StructuredTinT:
    """The same TinT with another inner learning rate (shares the auxiliary's tensors)."""
    cfg = TinTConfig(**{**tint.config.to_dict(), "inner_lr": lr})
    return StructuredTinT(tint.spec, cfg)
