"""Zero-shot and in-context (ICL) evaluation of a causal LM on a task.

ICL follows MeZO: ``num_demos`` demonstrations (prompt + gold continuation) drawn with the seed from the
train sample, joined by blank lines, before each test prompt, truncated on the left to the context
length. For classification the demonstrations are one shared prefix, run once and cached.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from hdopt.io import atomic_write_json
from hdopt.lm.generation import greedy_generate
from hdopt.lm.metrics import exact_match, f1_score
from hdopt.lm.models import load_model
from hdopt.lm.rundir import default_run_dir, write_jsonl
from hdopt.lm.scoring import Prefix, encode_options, encode_prefix, predict, starts_with_bos, truncate_left
from hdopt.lm.tasks import Example, Task, load_split, resolve_task, sample_protocol

METHODS = ("zero-shot", "icl")
DEMO_SEPARATOR = "\n\n"


@dataclass
class EvalConfig:
    """One evaluation run; the ``hdopt eval`` flags map onto these fields one to one."""

    model: str = "smollm2-135m"
    task: str = "sst2"
    method: str = "zero-shot"
    num_eval: int | None = 1000
    num_train: int = 1000
    num_dev: int | None = None  # None: the task's protocol value (500, or 100 for CB/COPA)
    num_demos: int = 32
    seed: int = 0
    data_dir: str | None = None
    max_length: int = 2048  # tokens of context (capped at the model's own); MeZO's OPT context
    batch_size: int = 16  # examples per forward (fewer when a batch would exceed batch_tokens)
    batch_tokens: int = 8192  # padded tokens per forward, prefix included
    max_new_tokens: int = 50
    dtype: str = "float32"
    device: str = "cpu"
    cache_dir: str | None = None
    output_dir: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        for name in ("num_train", "num_demos", "max_length", "batch_size", "batch_tokens", "max_new_tokens"):
            if getattr(self, name) < (0 if name in ("num_train", "num_demos") else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_eval is not None and self.num_eval < 1:
            raise ValueError(f"num_eval must be >= 1 (or None for the whole split), got {self.num_eval}")


@dataclass
class EvalResult:
    """Metrics (accuracy, or f1 and em, in percent), per-example predictions, and throughput."""

    metrics: dict[str, float]
    predictions: list[dict]
    tokens: int
    seconds: float
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        rate = self.tokens / self.seconds if self.seconds > 0 else float("nan")
        return {**self.metrics, "tokens": self.tokens, "seconds": round(self.seconds, 2),
                "tokens_per_second": round(rate, 1), **self.extra}  # fmt: skip


def select_demonstrations(train: Sequence[Example], num_demos: int, seed: int) -> list[Example]:
    """``num_demos`` examples of ``train`` in a seeded order (all of them when there are fewer)."""
    order = np.random.default_rng(seed).permutation(len(train))[:num_demos]
    return [train[i] for i in order]


def demonstration_text(demos: Sequence[Example]) -> str:
    """Demonstrations (prompt + gold continuation) joined by blank lines, ending with one ("" if none)."""
    return "".join(d.demonstration + DEMO_SEPARATOR for d in demos)


def _batches(lengths: Sequence[int], rows_per: Sequence[int], prefix_len: int, cfg: EvalConfig):
    """Index lists, longest first, each within ``batch_size`` examples and ``batch_tokens`` padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: list[int] = []
    for i in order:
        rows = sum(rows_per[j] for j in batch) + rows_per[i]
        width = max([lengths[j] for j in batch] + [lengths[i]]) + prefix_len
        if batch and (len(batch) == cfg.batch_size or rows * width > cfg.batch_tokens):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def _prefix_for(model, tokenizer, demos, row_budget: int, cfg: EvalConfig) -> tuple[Prefix | None, dict]:
    """Tokenise and cache the demonstrations, truncated on the left to leave ``row_budget`` tokens."""
    if not demos:
        return None, {"prefix_tokens": 0}
    ids = tokenizer(demonstration_text(demos)).input_ids
    kept = truncate_left(ids, max(cfg.max_length - row_budget, 1), starts_with_bos(tokenizer, ids))
    return encode_prefix(model, kept), {"prefix_tokens": len(kept), "prefix_truncated": len(kept) < len(ids)}


def _sequences_per_example(tokenizer, options: Sequence[str]) -> int:
    """Rows an example needs: options sharing all but their last token share a row."""
    return len({tuple(tokenizer(o, add_special_tokens=False).input_ids[:-1]) for o in options})


def evaluate_classification(
    model, tokenizer, examples: Sequence[Example], demos, cfg: EvalConfig
) -> EvalResult:
    """Accuracy of argmax mean option log-likelihood (after the shared demonstrations, if any)."""
    prompts = [tokenizer(e.prompt, add_special_tokens=not demos).input_ids for e in examples]
    option_lens = [
        max(len(tokenizer(o, add_special_tokens=False).input_ids) for o in e.options) for e in examples
    ]
    lengths = [len(p) + o for p, o in zip(prompts, option_lens, strict=True)]
    start = time.perf_counter()
    prefix, extra = _prefix_for(model, tokenizer, demos, max(lengths), cfg)
    prefix_len = prefix.length if prefix else 0
    records, tokens = [None] * len(examples), prefix_len
    rows_per = [_sequences_per_example(tokenizer, e.options) for e in examples]
    bar = tqdm(total=len(examples), desc="scoring", unit="ex", disable=not cfg.progress)
    for idx in _batches(lengths, rows_per, prefix_len, cfg):
        chunk = [examples[i] for i in idx]
        batch = encode_options(tokenizer, [e.prompt for e in chunk], [e.options for e in chunk],
                               [e.label for e in chunk], cfg.max_length - prefix_len,
                               add_special_tokens=prefix is None)  # fmt: skip
        device = model.get_input_embeddings().weight.device
        preds, table = predict(model, batch.to(device), prefix)
        tokens += int(batch.attention_mask.sum())
        for i, example, pred, row in zip(idx, chunk, preds.tolist(), table.tolist(), strict=True):
            scores = [round(s, 4) for s in row[: len(example.options)]]
            records[i] = {"uid": example.uid, "label": example.label, "prediction": pred,
                          "correct": pred == example.label, "scores": scores}  # fmt: skip
        bar.update(len(chunk))
    bar.close()
    seconds = time.perf_counter() - start
    accuracy = 100.0 * sum(r["correct"] for r in records) / len(records)
    shares = Counter(r["prediction"] for r in records)
    extra["prediction_share"] = {str(k): round(v / len(records), 3) for k, v in sorted(shares.items())}
    return EvalResult({"accuracy": round(accuracy, 2)}, records, tokens, seconds, extra)


def _answer_record(example: Example, answer: str) -> dict:
    gold = list(example.answers)
    return {"uid": example.uid, "prediction": answer.strip(), "answers": gold,
            "f1": f1_score(answer, gold), "em": exact_match(answer, gold)}  # fmt: skip


def evaluate_generation(model, tokenizer, examples: Sequence[Example], demos, cfg: EvalConfig) -> EvalResult:
    """SQuAD-style F1 and exact match of greedy answers (max ``max_new_tokens``, stop at a newline)."""
    context = demonstration_text(demos)
    prompts = [context + e.prompt for e in examples]
    budget = cfg.max_length - cfg.max_new_tokens
    prompt_lens = [min(len(tokenizer(p).input_ids), budget) for p in prompts]
    records, tokens = [], 0
    start = time.perf_counter()
    bar = tqdm(total=len(examples), desc="generating", unit="ex", disable=not cfg.progress)
    widths = [n + cfg.max_new_tokens for n in prompt_lens]
    for idx in _batches(widths, [1] * len(examples), 0, cfg):  # longest first, within the token budget
        answers = greedy_generate(
            model, tokenizer, [prompts[i] for i in idx], cfg.max_new_tokens, "\n", cfg.max_length
        )
        for i, answer in zip(idx, answers, strict=True):
            tokens += (
                prompt_lens[i] + len(tokenizer(answer, add_special_tokens=False).input_ids) + 1
            )  # + stop
            records.append(_answer_record(examples[i], answer))
        bar.update(len(idx))
    bar.close()
    seconds = time.perf_counter() - start
    order = {e.uid: k for k, e in enumerate(examples)}
    records.sort(key=lambda r: order[r["uid"]])
    f1 = 100.0 * sum(r["f1"] for r in records) / len(records)
    em = 100.0 * sum(r["em"] for r in records) / len(records)
    return EvalResult({"f1": round(f1, 2), "em": round(em, 2)}, records, tokens, seconds, {})


def evaluate(model, tokenizer, task: Task, examples: Sequence[Example], demos: Sequence[Example],
             cfg: EvalConfig) -> EvalResult:  # fmt: skip
    """Evaluate ``examples`` of ``task`` with ``demos`` as in-context demonstrations (empty: zero-shot)."""
    if not examples:
        raise ValueError(f"task {task.name!r}: no examples to evaluate")
    run = evaluate_generation if task.is_generation else evaluate_classification
    with torch.inference_mode():
        return run(model, tokenizer, examples, list(demos), cfg)


def context_length(model, requested: int) -> int:
    """``requested`` capped at the model's own context (``max_position_embeddings``), when it has one."""
    own = getattr(model.config, "max_position_embeddings", None)
    return min(requested, own) if own else requested


def run_eval(cfg: EvalConfig, model=None, tokenizer=None) -> tuple[dict, Path]:
    """Load the task data and the model, evaluate, and write the run folder.

    Args:
        cfg: the run's configuration.
        model, tokenizer: an already loaded pair (else ``load_model(cfg.model, ...)``).

    Returns:
        ``(results, run_dir)``; the folder holds config.json, results.json and predictions.jsonl.
    """
    task = resolve_task(cfg.task)
    eval_pool = load_split(task, "eval", cfg.data_dir)
    train_pool = load_split(task, "train", cfg.data_dir) if cfg.method == "icl" and cfg.num_demos else []
    num_dev = task.num_dev if cfg.num_dev is None else cfg.num_dev
    splits = sample_protocol(train_pool, eval_pool, cfg.seed, cfg.num_train, num_dev, cfg.num_eval)
    demos = select_demonstrations(splits.train, cfg.num_demos, cfg.seed) if cfg.method == "icl" else []
    if model is None:
        model, tokenizer = load_model(cfg.model, cfg.dtype, cfg.device, cfg.cache_dir)
    run_cfg = replace(cfg, max_length=context_length(model, cfg.max_length))
    result = evaluate(model, tokenizer, task, splits.eval, demos, run_cfg)
    results = {
        "task": task.name, "model": cfg.model, "method": cfg.method, "metric": task.metric,
        "num_eval": len(splits.eval), "num_demos": len(demos), "seed": cfg.seed, **result.summary(),
    }  # fmt: skip
    out = (
        Path(cfg.output_dir) if cfg.output_dir else default_run_dir("eval", task.name, cfg.method, cfg.model)
    )
    config = {**asdict(cfg), "effective_max_length": run_cfg.max_length}
    atomic_write_json(out / "config.json", config, default=str)
    write_jsonl(out / "predictions.jsonl", result.predictions)
    atomic_write_json(out / "results.json", results, default=str)  # last: its presence marks a finished run
    return results, out
