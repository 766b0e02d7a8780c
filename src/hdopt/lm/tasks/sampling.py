"""The sampling protocols: MeZO's (OPT) train/dev/eval draws and LM-BFF's k examples per class."""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hdopt.lm.tasks.base import Example, TaskWarning


@dataclass(frozen=True)
class Splits:
    """The examples one run uses: train (and ICL demonstrations), dev (model selection), eval (test)."""

    train: list[Example]
    dev: list[Example]
    eval: list[Example]


def _permuted(examples: Sequence[Example], seed: int) -> list[Example]:
    order = np.random.default_rng(seed).permutation(len(examples))
    return [examples[i] for i in order]


def sample_protocol(
    train_pool: Sequence[Example],
    eval_pool: Sequence[Example],
    seed: int,
    num_train: int = 1000,
    num_dev: int = 500,
    num_eval: int | None = 1000,
) -> Splits:
    """MeZO's protocol: one seeded draw of ``num_train + num_dev`` examples from the train pool, the last
    ``num_dev`` of them being dev; ``num_eval`` seeded draws from the eval pool.

    A small pool gives fewer: all of it is drawn, dev keeps ``num_dev`` and train gets the rest (so WSC,
    554 rows with dev 500, trains on 54; CB, 250 rows with dev 100, on 150). ``num_eval=None`` keeps the
    whole eval pool. Eval prompts that also appear in the train pool are counted in a warning (a train
    file that contains the test rows leaks them into training and demonstrations).
    """
    shared = shared_prompts(train_pool, eval_pool)
    if shared:
        task = eval_pool[0].uid.split("/")[0]
        warnings.warn(
            f"task {task!r}: {shared} of the {len(eval_pool)} eval prompts also appear in the train split, "
            "so training and demonstrations may include test examples; if the train file is a pool that "
            "holds the test rows, subtract them (task file: data: {train: {path: ..., minus: eval}})",
            TaskWarning,
            stacklevel=2,
        )
    drawn = _permuted(train_pool, seed)[: num_train + num_dev]
    n_dev = min(num_dev, max(len(drawn) - 1, 0))  # never leave train empty
    train, dev = drawn[: len(drawn) - n_dev], drawn[len(drawn) - n_dev :]
    evaluation = _permuted(eval_pool, seed)
    if num_eval is not None:
        evaluation = evaluation[:num_eval]
    return Splits(train=train[:num_train], dev=dev, eval=evaluation)


def shared_prompts(train_pool: Sequence[Example], eval_pool: Sequence[Example]) -> int:
    """How many examples of ``eval_pool`` have a prompt that some example of ``train_pool`` has too."""
    train = {e.prompt for e in train_pool}
    return sum(e.prompt in train for e in eval_pool)


def sample_per_class(examples: Sequence[Example], k: int, seed: int) -> list[Example]:
    """``k`` examples of every label (LM-BFF's k-shot draw), in a seeded order.

    Generation tasks (no labels) get ``k`` examples in all.
    """
    shuffled = _permuted(examples, seed)
    if all(e.label is None for e in shuffled):
        return shuffled[:k]
    by_label: dict[int, list[Example]] = defaultdict(list)
    for example in shuffled:
        if len(by_label[example.label]) < k:
            by_label[example.label].append(example)
    chosen = {id(e) for group in by_label.values() for e in group}
    return [e for e in shuffled if id(e) in chosen]
