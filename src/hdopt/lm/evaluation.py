"""Zero-shot and in-context (ICL) evaluation of a causal LM on a task.

ICL follows MeZO: ``num_demos`` demonstrations (prompt + gold continuation) drawn with the seed from the
train sample (or the task's fewshot split), joined by blank lines (the task's ``demo_separator``), before
each test prompt, truncated on the left to the context length (with a warning). For classification the
demonstrations are one shared prefix, run once and cached.

``run_eval`` checks everything a user can get wrong (task file, data, output folder, context length,
label words) before the first forward pass, and writes each batch's predictions as it finishes.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from hdopt.io import atomic_write_json
from hdopt.lm.generation import greedy_generate
from hdopt.lm.metrics import exact_match, f1_score
from hdopt.lm.models import load_model
from hdopt.lm.rundir import JsonlWriter, default_run_dir, write_jsonl
from hdopt.lm.scoring import Prefix, encode_options, encode_prefix, predict, starts_with_bos, truncate_left
from hdopt.lm.task_checks import check_label_words, longest_option
from hdopt.lm.tasks import Example, Task, TaskWarning, load_split, resolve_task, sample_protocol

METHODS = ("zero-shot", "icl")
DEMO_SEPARATOR = "\n\n"
DEFAULT_DEMOS = 32  # MeZO's ICL demonstrations, unless the task file's num_fewshot says otherwise
DEFAULT_NEW_TOKENS = 50  # MeZO's generation length, unless the task file's max_gen_toks says otherwise
OnRecords = Callable[[list[dict]], None]


class EvalError(ValueError):
    """An evaluation setting or the run folder cannot work; the message says what to change."""


@dataclass
class EvalConfig:
    """One evaluation run; the ``hdopt eval`` flags map onto these fields one to one."""

    model: str = "smollm2-135m"
    task: str = "sst2"
    method: str = "zero-shot"
    num_eval: int | None = 1000
    num_train: int = 1000
    num_dev: int | None = None  # None: the task's protocol value (500, or 100 for CB/COPA)
    num_demos: int | None = None  # None: the task file's num_fewshot, else DEFAULT_DEMOS
    seed: int = 0
    data_dir: str | None = None
    max_length: int = 2048  # tokens of context (capped at the model's own); MeZO's OPT context
    batch_size: int = 16  # examples per forward (fewer when a batch would exceed batch_tokens)
    batch_tokens: int = 8192  # padded tokens per forward, prefix included
    max_new_tokens: int | None = None  # None: the task file's max_gen_toks, else DEFAULT_NEW_TOKENS
    dtype: str = "float32"
    device: str = "cpu"
    cache_dir: str | None = None
    output_dir: str | None = None
    progress: bool = True
    allow_outside_data: bool = False  # a task file may read data outside its folder

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise EvalError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        for name in ("num_train", "num_demos", "max_length", "batch_size", "batch_tokens", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < (0 if name in ("num_train", "num_demos") else 1):
                raise EvalError(f"{name} must be positive, got {value}")
        if self.num_eval is not None and self.num_eval < 1:
            raise EvalError(f"num_eval must be >= 1 (or None for the whole split), got {self.num_eval}")

    def for_task(self, task: Task) -> EvalConfig:
        """This config with the task's defaults filled in (demonstrations, generation length)."""
        demos = self.num_demos if self.num_demos is not None else task.num_fewshot
        tokens = self.max_new_tokens if self.max_new_tokens is not None else task.max_new_tokens
        return replace(self, num_demos=DEFAULT_DEMOS if demos is None else demos,
                       max_new_tokens=tokens or DEFAULT_NEW_TOKENS)  # fmt: skip


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


def demonstration_text(demos: Sequence[Example], separator: str = DEMO_SEPARATOR) -> str:
    """Demonstrations (prompt + gold continuation), each followed by ``separator`` ("" if none)."""
    return "".join(d.demonstration + separator for d in demos)


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


def _prefix_for(
    model, tokenizer, task: Task, demos, row_budget: int, cfg: EvalConfig
) -> tuple[Prefix | None, dict]:
    """Tokenise and cache the demonstrations, truncated on the left to leave ``row_budget`` tokens."""
    if not demos:
        return None, {"prefix_tokens": 0}
    ids = tokenizer(demonstration_text(demos, task.demo_separator)).input_ids
    kept = truncate_left(ids, max(cfg.max_length - row_budget, 1), starts_with_bos(tokenizer, ids))
    if len(kept) < len(ids):
        warnings.warn(
            f"ICL: the {len(demos)} demonstrations are {len(ids)} tokens; only their last {len(kept)} fit "
            f"the {cfg.max_length}-token context (--max-length, capped at the model's) beside the longest "
            "test prompt, so the first ones are cut (use fewer --num-demos to keep them whole)",
            TaskWarning,
            stacklevel=3,
        )
    return encode_prefix(model, kept), {"prefix_tokens": len(kept), "prefix_truncated": len(kept) < len(ids)}


def _sequences_per_example(tokenizer, options: Sequence[str]) -> int:
    """Rows an example needs: options sharing all but their last token share a row."""
    return len({tuple(tokenizer(o, add_special_tokens=False).input_ids[:-1]) for o in options})


def _warn_cut_prompts(count: int, total: int, budget: int) -> dict:
    if count:
        warnings.warn(
            f"{count} of {total} test prompts (with their demonstrations, if any) are longer than the "
            f"{budget} tokens the context leaves them (--max-length); they are cut on the left",
            TaskWarning,
            stacklevel=3,
        )
    return {"prompts_truncated": count}


def _classification_record(task: Task, example: Example, pred: int, scores: list[float]) -> dict:
    """One prediction: the gold and predicted option texts (and positions), and every option's score."""
    record = {
        "uid": example.uid, "label": example.options[example.label], "prediction": example.options[pred],
        "correct": pred == example.label, "label_index": example.label, "prediction_index": pred,
        "scores": [round(s, 4) for s in scores[: len(example.options)]],
    }  # fmt: skip
    if not task.label_words:
        record["options"] = list(example.options)
    return record


def evaluate_classification(
    model, tokenizer, task: Task, examples: Sequence[Example], demos, cfg: EvalConfig,
    on_records: OnRecords | None = None,
) -> EvalResult:  # fmt: skip
    """Accuracy of the argmax option log-likelihood (after the shared demonstrations, if any)."""
    prompts = [tokenizer(e.prompt, add_special_tokens=not demos).input_ids for e in examples]
    option_lens = [
        max(len(tokenizer(o, add_special_tokens=False).input_ids) for o in e.options) for e in examples
    ]
    lengths = [len(p) + o for p, o in zip(prompts, option_lens, strict=True)]
    start = time.perf_counter()
    prefix, extra = _prefix_for(model, tokenizer, task, demos, max(lengths), cfg)
    prefix_len = prefix.length if prefix else 0
    extra.update(_warn_cut_prompts(sum(n > cfg.max_length - prefix_len for n in lengths), len(examples),
                                   cfg.max_length - prefix_len))  # fmt: skip
    records, tokens = [None] * len(examples), prefix_len
    rows_per = [_sequences_per_example(tokenizer, e.options) for e in examples]
    bar = tqdm(total=len(examples), desc="scoring", unit="ex", disable=not cfg.progress)
    for idx in _batches(lengths, rows_per, prefix_len, cfg):
        chunk = [examples[i] for i in idx]
        batch = encode_options(tokenizer, [e.prompt for e in chunk], [e.options for e in chunk],
                               [e.label for e in chunk], cfg.max_length - prefix_len,
                               add_special_tokens=prefix is None)  # fmt: skip
        device = model.get_input_embeddings().weight.device
        preds, table = predict(model, batch.to(device), prefix, task.option_score)
        tokens += int(batch.attention_mask.sum())
        for i, example, pred, row in zip(idx, chunk, preds.tolist(), table.tolist(), strict=True):
            records[i] = _classification_record(task, example, pred, row)
        if on_records is not None:
            on_records([records[i] for i in idx])
        bar.update(len(chunk))
    bar.close()
    seconds = time.perf_counter() - start
    accuracy = 100.0 * sum(r["correct"] for r in records) / len(records)
    key = "prediction" if task.label_words else "prediction_index"
    shares = Counter(r[key] for r in records)
    extra["prediction_share"] = {str(k): round(v / len(records), 3) for k, v in sorted(shares.items())}
    return EvalResult({"accuracy": round(accuracy, 2)}, records, tokens, seconds, extra)


def _answer_record(example: Example, answer: str) -> dict:
    gold = list(example.answers)
    return {"uid": example.uid, "prediction": answer.strip(), "answers": gold,
            "f1": f1_score(answer, gold), "em": exact_match(answer, gold)}  # fmt: skip


def evaluate_generation(
    model, tokenizer, task: Task, examples: Sequence[Example], demos, cfg: EvalConfig,
    on_records: OnRecords | None = None,
) -> EvalResult:  # fmt: skip
    """SQuAD-style F1 and exact match of greedy answers (``max_new_tokens``, cut at the task's stops)."""
    context = demonstration_text(demos, task.demo_separator)
    prompts = [context + e.prompt for e in examples]
    budget = cfg.max_length - cfg.max_new_tokens
    full_lens = [len(tokenizer(p).input_ids) for p in prompts]
    extra = {"prefix_tokens": len(tokenizer(context, add_special_tokens=False).input_ids) if demos else 0}
    extra.update(_warn_cut_prompts(sum(n > budget for n in full_lens), len(examples), budget))
    prompt_lens = [min(n, budget) for n in full_lens]
    records, tokens = [], 0
    start = time.perf_counter()
    bar = tqdm(total=len(examples), desc="generating", unit="ex", disable=not cfg.progress)
    widths = [n + cfg.max_new_tokens for n in prompt_lens]
    for idx in _batches(widths, [1] * len(examples), 0, cfg):  # longest first, within the token budget
        answers = greedy_generate(
            model, tokenizer, [prompts[i] for i in idx], cfg.max_new_tokens, task.stop, cfg.max_length
        )
        batch_records = []
        for i, answer in zip(idx, answers, strict=True):
            tokens += (
                prompt_lens[i] + len(tokenizer(answer, add_special_tokens=False).input_ids) + 1
            )  # + stop
            batch_records.append(_answer_record(examples[i], answer))
        records += batch_records
        if on_records is not None:
            on_records(batch_records)
        bar.update(len(idx))
    bar.close()
    seconds = time.perf_counter() - start
    order = {e.uid: k for k, e in enumerate(examples)}
    records.sort(key=lambda r: order[r["uid"]])
    f1 = 100.0 * sum(r["f1"] for r in records) / len(records)
    em = 100.0 * sum(r["em"] for r in records) / len(records)
    return EvalResult({"f1": round(f1, 2), "em": round(em, 2)}, records, tokens, seconds, extra)


def evaluate(model, tokenizer, task: Task, examples: Sequence[Example], demos: Sequence[Example],
             cfg: EvalConfig, on_records: OnRecords | None = None) -> EvalResult:  # fmt: skip
    """Evaluate ``examples`` of ``task`` with ``demos`` as in-context demonstrations (empty: zero-shot).

    ``on_records`` receives each batch's per-example records as soon as the batch is done.
    """
    if not examples:
        raise EvalError(f"task {task.name!r}: no examples to evaluate")
    run = evaluate_generation if task.is_generation else evaluate_classification
    with torch.inference_mode():
        return run(model, tokenizer, task, examples, list(demos), cfg.for_task(task), on_records)


def context_length(model, requested: int) -> int:
    """``requested`` capped at the model's own context (``max_position_embeddings``), when it has one."""
    own = getattr(model.config, "max_position_embeddings", None)
    return min(requested, own) if own else requested


def check_room(task: Task, examples: Sequence[Example], tokenizer, cfg: EvalConfig) -> None:
    """Raise :class:`EvalError` when ``cfg.max_length`` cannot hold a prompt token plus an answer."""
    if task.is_generation:
        if cfg.max_length <= cfg.max_new_tokens:
            raise EvalError(
                f"--max-length {cfg.max_length} leaves no room for a prompt beside --max-new-tokens "
                f"{cfg.max_new_tokens}: give a larger --max-length or fewer new tokens"
            )
        return
    option, n = longest_option(tokenizer, examples)
    if cfg.max_length < n + 1:
        raise EvalError(
            f"--max-length {cfg.max_length} leaves no room: the longest option {option!r} is {n} token(s) "
            f"and the prompt needs at least one more; use --max-length {n + 1} or more"
        )


def choose_demonstrations(task: Task, cfg: EvalConfig, train: Sequence[Example]) -> list[Example]:
    """The ICL demonstrations: from the task's fewshot split when it has one, else from the train sample."""
    if cfg.method != "icl" or not cfg.num_demos:
        return []
    pool = load_split(task, "fewshot", cfg.data_dir) if "fewshot" in task.files else train
    return select_demonstrations(pool, cfg.num_demos, cfg.seed)


def _open_run_dir(out: Path, config: dict) -> bool:
    """Create the run folder and write config.json, or say why it cannot; True if the folder is new."""
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", config, default=str)
    except OSError as error:
        raise EvalError(
            f"cannot write the run folder {out} ({error.strerror or error}); choose a writable --output-dir"
        ) from error
    return created


def _discard_run_dir(out: Path, created: bool) -> None:
    """Remove what a run that never started wrote (config.json, and the folder if the run made it)."""
    (out / "config.json").unlink(missing_ok=True)
    if created and not any(out.iterdir()):
        out.rmdir()


def run_eval(cfg: EvalConfig, model=None, tokenizer=None) -> tuple[dict, Path]:
    """Load the task data and the model, check them, evaluate, and write the run folder.

    Every input a user can get wrong (task, data, output folder, context length, label words) is
    checked before the first forward pass; predictions.jsonl grows batch by batch while the run goes
    and is rewritten in example order at the end.

    Args:
        cfg: the run's configuration.
        model, tokenizer: an already loaded pair (else ``load_model(cfg.model, ...)``).

    Returns:
        ``(results, run_dir)``; the folder holds config.json, results.json and predictions.jsonl.
    """
    task = resolve_task(cfg.task, allow_outside=True if cfg.allow_outside_data else None)
    cfg = cfg.for_task(task)
    if cfg.method == "zero-shot" and task.num_fewshot:
        warnings.warn(f"task {task.name!r} asks for num_fewshot: {task.num_fewshot}; --method zero-shot uses "
                      "no demonstrations (use --method icl)", TaskWarning, stacklevel=2)  # fmt: skip
    eval_pool = load_split(task, "eval", cfg.data_dir)
    use_train = cfg.method == "icl" and cfg.num_demos and "fewshot" not in task.files
    train_pool = load_split(task, "train", cfg.data_dir) if use_train else []
    num_dev = task.num_dev if cfg.num_dev is None else cfg.num_dev
    splits = sample_protocol(train_pool, eval_pool, cfg.seed, cfg.num_train, num_dev, cfg.num_eval)
    demos = choose_demonstrations(task, cfg, splits.train)
    out = (
        Path(cfg.output_dir) if cfg.output_dir else default_run_dir("eval", task.name, cfg.method, cfg.model)
    )
    created = _open_run_dir(out, asdict(cfg))
    try:
        if model is None:
            model, tokenizer = load_model(cfg.model, cfg.dtype, cfg.device, cfg.cache_dir)
        run_cfg = replace(cfg, max_length=context_length(model, cfg.max_length))
        check_room(task, splits.eval, tokenizer, run_cfg)
        for message in check_label_words(task, tokenizer, splits.eval):
            warnings.warn(message, TaskWarning, stacklevel=2)
        atomic_write_json(out / "config.json", {**asdict(cfg), "effective_max_length": run_cfg.max_length},
                          default=str)
    except BaseException:
        _discard_run_dir(out, created)
        raise
    with JsonlWriter(out / "predictions.jsonl") as writer:
        result = evaluate(model, tokenizer, task, splits.eval, demos, run_cfg, writer.write)
    results = {
        "task": task.name, "model": cfg.model, "method": cfg.method, "metric": task.metric,
        "num_eval": len(splits.eval), "num_demos": len(demos), "seed": cfg.seed, **result.summary(),
    }  # fmt: skip
    write_jsonl(out / "predictions.jsonl", result.predictions)  # in example order
    atomic_write_json(out / "results.json", results, default=str)  # last: its presence marks a finished run
    return results, out
