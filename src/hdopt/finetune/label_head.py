"""Linear-probe head (``--lp-init``): start fine-tuning from a logistic regression on the model's features.

On a task whose options are one-token label words (SST-2's `` terrible``/`` great``), the model's class
scores are ``W[label token] . h``, where ``h`` is the LM head's input at the last prompt token; the
cross-entropy over the options is a softmax over those scores. A logistic regression on ``h`` (no
intercept) is therefore exactly a choice of the label-word rows of the head, up to a row added to all of
them. LP-then-fine-tune (Kumar et al. 2022) fits that regression first and writes it into the head, so that
training (MeZO or backprop, on any adapter) starts from the probe's classifier instead of the prompt's.

The features are taken with the adapter attached (a prefix changes ``h``), through the same encoding and
scoring path as the training loss. The inverse regularisation ``C`` is picked on dev (highest accuracy,
ties to the stronger regularisation); without dev examples, by 5-fold cross-validation on train.
The head is untied from the input embedding first (:func:`hdopt.finetune.head.untie_head`), so only the
label-word rows of the output embedding change. The rows are saved in the run folder
(``lp_head.safetensors``), so resume, replay and :func:`hdopt.finetune.load_trained` rebuild the same
starting model without refitting.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from hdopt.finetune.checkpoint import load_checkpoint, save_checkpoint
from hdopt.finetune.head import untie_head
from hdopt.lm.scoring import encode_examples, token_logprobs, unwrap_peft
from hdopt.lm.tasks import Example, Task

C_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)  # inverse L2 strength, on features divided by their std


@dataclass
class LabelHead:
    """The label-word rows a probe writes into the LM head, and how the probe was chosen."""

    token_ids: list[int]  # one token per class, in label order
    rows: torch.Tensor  # [classes, hidden]: the head's new rows for those tokens
    c: float  # the regularisation picked
    train_accuracy: float  # the probe's, in percent
    dev_accuracy: float | None  # the probe's on dev (None without dev examples)
    seconds: float = 0.0  # the time the fit took (feature passes included); part of the run's wall time

    def meta(self) -> dict:
        """The probe's record (what it is; its time is kept apart, as results.json's ``probe_seconds``)."""
        return {"token_ids": self.token_ids, "c": self.c, "train_accuracy": self.train_accuracy,
                "dev_accuracy": self.dev_accuracy}  # fmt: skip


def label_token_ids(tokenizer, task: Task) -> list[int]:
    """The one token of each label word; a clear error when a word is several tokens or two share one."""
    if not task.label_words:
        raise ValueError(
            f"--lp-init needs a task with fixed label words and {task.name!r} has none (multiple choice or "
            "generation); leave --lp-init off"
        )
    ids = []
    for word in task.label_words:
        tokens = tokenizer(word, add_special_tokens=False).input_ids
        if len(tokens) != 1:
            raise ValueError(
                f"--lp-init writes the probe into the label words' head rows, but label word {word!r} "
                f"of task {task.name!r} is {len(tokens)} tokens for this tokenizer; choose one-token "
                "label words or leave --lp-init off"
            )
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"the label words {task.label_words} of {task.name!r} share a token: no probe fits")
    return ids


@torch.no_grad()
def head_inputs(model: nn.Module, tokenizer, examples: Sequence[Example], max_length: int,
                batch_size: int = 32, progress: str | None = None) -> np.ndarray:  # fmt: skip
    """``[N, hidden]`` float64: the LM head's input where it predicts each example's (one-token) option.

    Runs the scoring path of the training loss (:func:`hdopt.lm.scoring.token_logprobs`, adapters
    included) and records what the head receives. ``progress``: a tqdm bar with that description.
    """
    inner = unwrap_peft(model) or model
    head = inner.get_output_embeddings()
    device = head.weight.device
    seen: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    was_training = model.training
    model.eval()
    out = []
    starts = range(0, len(examples), batch_size)
    try:
        for i in tqdm(starts, desc=progress, unit="batch", disable=progress is None, leave=False):
            batch = encode_examples(tokenizer, examples[i : i + batch_size], max_length).to(device)
            if int(batch.option_length.max()) != 1:
                raise ValueError("head_inputs needs one-token options (see label_token_ids)")
            seen.clear()
            token_logprobs(model, batch)
            hidden = seen[-1]
            if hidden.dim() == 3:  # the full-forward path: the head saw every position
                hidden = hidden[batch.target_seq, batch.target_pos]
            first = batch.option_index[batch.target_option] == 0  # one row per example
            out.append(hidden[first].double().cpu().numpy())
    finally:
        hook.remove()
        model.train(was_training)
    return np.concatenate(out)


def _fit(x: np.ndarray, y: np.ndarray, c: float, seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, fit_intercept=False, max_iter=5000, random_state=seed).fit(x, y)


def fit_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    dev_x: np.ndarray | None,
    dev_y: np.ndarray | None,
    num_classes: int,
    c: float | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, float, float, float | None]:
    """Fit the no-intercept logistic regression; returns ``(class scores weights [K, H], C, train %, dev %)``.

    Features are divided by their train standard deviation (not centred: a centring shift would need an
    intercept, which a head row cannot hold) and the weights are mapped back to raw-feature units, so that
    ``x @ weights.T`` are the probe's class scores. ``c=None`` picks C from :data:`C_GRID`.
    """
    scale = train_x.std(axis=0) + 1e-6
    xs = train_x / scale
    labels = set(np.unique(train_y).tolist())
    if len(labels) < 2:
        raise ValueError("the linear probe needs training examples of at least two classes")
    if c is None:
        if dev_x is not None and len(dev_x):
            dev_xs = dev_x / scale
            scored = [(np.mean(_fit(xs, train_y, g, seed).predict(dev_xs) == dev_y), -g) for g in C_GRID]
            c = -max(scored)[1]  # the best dev accuracy; ties to the smaller C
        else:
            from sklearn.linear_model import LogisticRegressionCV

            # scoring fixed: scikit-learn 1.11 changes its default to the log loss
            cv = LogisticRegressionCV(Cs=list(C_GRID), fit_intercept=False, cv=5, max_iter=5000,
                                      scoring="accuracy")
            c = float(np.ravel(cv.fit(xs, train_y).C_)[0])  # C_ is per class today, one value in 1.10+
    probe = _fit(xs, train_y, c, seed)
    coef = probe.coef_ / scale  # raw-feature units
    weights = np.zeros((num_classes, train_x.shape[1]))
    if coef.shape[0] == 1:  # binary: one score for the larger class against the smaller
        lo, hi = probe.classes_
        weights[lo], weights[hi] = -coef[0] / 2, coef[0] / 2
    else:
        weights[probe.classes_] = coef

    def accuracy(x, y) -> float:
        return round(100.0 * float(np.mean(np.argmax(x @ weights.T, axis=1) == y)), 2)

    dev = accuracy(dev_x, dev_y) if dev_x is not None and len(dev_x) else None
    return weights, float(c), accuracy(train_x, train_y), dev


def fit_label_head(
    model: nn.Module,
    tokenizer,
    task: Task,
    train: Sequence[Example],
    dev: Sequence[Example],
    max_length: int,
    c: float | None = None,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = False,
) -> LabelHead:
    """Fit the probe on ``model``'s head inputs and return the label-word rows that implement it.

    Only the differences between the rows matter to the classifier; the rows returned are the model's
    own rows moved by the least change that gives those differences (a common shift removed).
    ``progress`` shows a bar for each feature pass; the time it all took is the head's ``seconds``.
    """
    start = time.perf_counter()
    ids = label_token_ids(tokenizer, task)
    bar = (lambda split: f"--lp-init features ({split})") if progress else (lambda split: None)
    train_x = head_inputs(model, tokenizer, train, max_length, batch_size, bar("train"))
    dev_x = head_inputs(model, tokenizer, dev, max_length, batch_size, bar("dev")) if dev else None
    train_y = np.array([e.label for e in train])
    dev_y = np.array([e.label for e in dev]) if dev else None
    weights, c, train_acc, dev_acc = fit_probe(train_x, train_y, dev_x, dev_y, len(ids), c, seed)
    head = (unwrap_peft(model) or model).get_output_embeddings()
    old = head.weight.detach()[ids].double().cpu()
    target = torch.from_numpy(weights)
    rows = target - (target - old).mean(dim=0, keepdim=True)  # nearest to ``old`` with target's differences
    seconds = round(time.perf_counter() - start, 2)
    return LabelHead(ids, rows.to(head.weight.dtype), c, train_acc, dev_acc, seconds)


def apply_label_head(model: nn.Module, label_head: LabelHead) -> None:
    """Untie the LM head (if tied) and write the probe's rows into it; the rest of the model is unchanged."""
    head = untie_head(unwrap_peft(model) or model)
    with torch.no_grad():
        rows = label_head.rows.to(device=head.weight.device, dtype=head.weight.dtype)
        head.weight[label_head.token_ids] = rows


def save_label_head(path: str | Path, label_head: LabelHead) -> None:
    """Write the rows and the probe's record to a safetensors file (atomically)."""
    meta = {**label_head.meta(), "seconds": label_head.seconds}
    save_checkpoint(Path(path), [("rows", label_head.rows)], meta=meta)


def load_label_head(path: str | Path) -> LabelHead:
    """Read what :func:`save_label_head` wrote."""
    weights, _, meta = load_checkpoint(Path(path))
    record = (float(meta["c"]), float(meta["train_accuracy"]), meta["dev_accuracy"], meta.get("seconds", 0.0))
    return LabelHead(list(meta["token_ids"]), weights["rows"], *record)
