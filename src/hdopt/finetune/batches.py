"""Training batches and objectives.

Batches are a pure function of (seed, step): step ``t`` takes positions ``[t*B, (t+1)*B)`` of an endless
stream of seeded permutations of the training set, one per epoch. Nothing about the data order needs saving,
so a resumed run sees exactly the batches an uninterrupted one would.

Objectives (MeZO section 3): classification tasks with fixed label words train on cross-entropy over the
options' length-normalised log-likelihoods; multiple-choice tasks with per-example options (COPA, ReCoRD)
and generation tasks on the teacher-forced answer loss. With ZO any objective works, differentiable or not:
``accuracy`` (minus the batch accuracy) and ``f1`` (minus the mean F1 of greedy answers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from hdopt.lm.generation import greedy_generate
from hdopt.lm.metrics import f1_score
from hdopt.lm.scoring import (
    OptionBatch,
    answer_loss,
    classification_loss,
    encode_answers,
    encode_examples,
    predict,
)
from hdopt.lm.tasks import Example, Task

MAX_NEW_TOKENS = 50  # greedy answers: at most 50 tokens, stop at a newline (MeZO)


def step_indices(num_examples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Indices of the examples of optimizer step ``step`` (epochs are seeded permutations)."""
    out, perms = [], {}
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, num_examples)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(num_examples)
        out.append(int(perms[epoch][offset]))
    return out


def micro_batches(indices: Sequence[int], grad_accum: int) -> list[list[int]]:
    """Split one step's indices into ``grad_accum`` equal micro-batches."""
    size = len(indices) // grad_accum
    return [list(indices[i * size : (i + 1) * size]) for i in range(grad_accum)]


def uses_answer_loss(task: Task) -> bool:
    """True for generation and per-example-option tasks (trained on the gold continuation's tokens)."""
    return task.is_generation or task.options_column is not None


def check_objective(task: Task, objective: str, any_objective: bool) -> None:
    """Raise a clear error for objective/task/method combinations that cannot work (``any_objective``:
    the method trains on non-differentiable objectives too, as forward-only methods do)."""
    if objective == "loss":
        return
    if not any_objective:
        raise ValueError(f"objective {objective!r} is not differentiable: use a ZO method (mezo, ...)")
    if objective == "accuracy" and task.is_generation:
        raise ValueError(f"task {task.name!r} is a generation task: use --objective f1 (or loss)")
    if objective == "f1" and not task.is_generation:
        raise ValueError(f"task {task.name!r} is a classification task: use --objective accuracy (or loss)")


def encode(task: Task, tokenizer, examples: Sequence[Example], max_length: int, device) -> OptionBatch:
    """The rows the loss needs for ``examples``."""
    enc = encode_answers if uses_answer_loss(task) else encode_examples
    return enc(tokenizer, examples, max_length).to(device)


def make_closure(model, tokenizer, task: Task, examples: Sequence[Example], objective: str, max_length: int,
                 device) -> Callable[[], torch.Tensor]:  # fmt: skip
    """A closure returning the batch objective (a scalar tensor; differentiable for ``loss``)."""
    if objective == "f1":
        prompts = [e.prompt for e in examples]

        def f1_objective() -> torch.Tensor:
            budget = max_length + MAX_NEW_TOKENS  # max_length bounds the prompt; answers come on top
            answers = greedy_generate(model, tokenizer, prompts, MAX_NEW_TOKENS, max_length=budget)
            scores = [f1_score(a, list(e.answers)) for a, e in zip(answers, examples, strict=True)]
            return torch.tensor(-sum(scores) / len(scores))

        return f1_objective
    if objective == "accuracy":
        batch = encode_examples(tokenizer, examples, max_length).to(device)
        return lambda: -(predict(model, batch)[0] == batch.labels).float().mean()
    batch = encode(task, tokenizer, examples, max_length, device)
    loss = answer_loss if uses_answer_loss(task) else classification_loss
    return lambda: loss(model, batch)
