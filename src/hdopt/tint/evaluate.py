"""The TinT experiments as small functions: few-shot sentiment classification and language modelling.

Methods compared (same auxiliary model, same data):
* ``icl``: in-context learning (the demonstrations are only context);
* ``tint``: a TinT forward pass (simulated SGD on the demonstrations, then the query with the demonstrations
  in context);
* ``ft``: explicit fine-tuning with torch autograd (:func:`hdopt.tint.baselines.sgd_finetune`), same rule.
With 0 shots the context is the test input itself (TinT and FT take one step on its language-modelling loss).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from hdopt.tint.baselines import sgd_finetune
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


def _score(tint: StructuredTinT, blocks, queries: list[list[int]], words: list[int],
           past=None) -> torch.Tensor:
    """Label-word logits (B, 2) at each query's last token."""
    ids, mask = _pad(queries)
    logits, _ = tint.run(ids, blocks, past=past, positions=mask.sum(1) - 1)  # (B, 1, V) at the last token
    return logits[:, 0, words]


def _targets(T: int, positions: list[int]) -> torch.Tensor:
    t = torch.zeros(1, T, dtype=torch.bool)
    t[0, positions] = True
    return t


def classify(method: str, model, tokenizer, tint: StructuredTinT, demos: list[Example],
             tests: list[Example], batch: int = 32) -> float:
    """Accuracy of ``method`` on ``tests`` with ``demos`` (possibly none) as demonstrations."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    words, cfg = label_ids(tokenizer), tint.config
    queries = [query_ids(tokenizer, s) for s, _ in tests]
    labels = torch.tensor([y for _, y in tests])
    if not demos:
        step = 8  # 0 shots: one fine-tuned copy of the top blocks per query, so smaller batches
        preds = torch.cat([_zero_shot(method, model, tint, queries[i:i + step], words)
                           for i in range(0, len(queries), step)])
        return float((preds == labels).float().mean())
    prompt = build_prompt(tokenizer, demos)
    ctx = torch.tensor([prompt.ids])
    targets = _targets(ctx.shape[1], prompt.label_positions)  # label-token-only loss
    top = None
    if method == "tint":
        top, _ = tint.adapt(ctx, targets)
    elif method == "ft":
        top, _ = sgd_finetune(model, ctx, targets, cfg.n_layers, cfg.n_steps, cfg.inner_lr, cfg.reduction)
    blocks = tint.blocks_with(top)
    _, past = tint.run(ctx, blocks, logits_from=ctx.shape[1] - 1, want_cache=True)
    preds = torch.cat([_score(tint, blocks, queries[i:i + batch], words, past).argmax(-1)
                       for i in range(0, len(queries), batch)])
    return float((preds == labels).float().mean())


def _zero_shot(method: str, model, tint: StructuredTinT, queries: list[list[int]], words) -> torch.Tensor:
    """0 shots: ICL scores the bare query; TinT/FT first take steps on the query's own LM loss."""
    if method == "icl":
        return _score(tint, tint.blocks_with(None), queries, words).argmax(-1)
    if method == "tint":
        ids, mask = _pad(queries)
        top, _ = tint.adapt(ids, key_mask=mask)  # one simulated fine-tuning per query (batched)
        return _score(tint, tint.blocks_with(top), queries, words).argmax(-1)
    cfg, preds = tint.config, []
    for q in queries:
        ids = torch.tensor([q])
        targets = torch.ones_like(ids, dtype=torch.bool)
        top, _ = sgd_finetune(model, ids, targets, cfg.n_layers, cfg.n_steps, cfg.inner_lr, cfg.reduction)
        preds.append(_score(tint, tint.blocks_with(top), [q], words).argmax(-1))
    return torch.cat(preds)


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
