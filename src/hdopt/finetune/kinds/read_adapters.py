"""Node perturbation of read-position adapters: forward passes only, every block, the context cached.

The method ``read-adapters`` trains the ``read`` adapter (:mod:`hdopt.lm.read_adapters`: a rank-r bottleneck
in every block that acts only at each row's last token, the position whose output predicts the label word).
The frozen model's keys and values of every training and dev prompt before its last token are computed
once, when the run starts (:class:`hdopt.lm.read_path.ContextCache`, in a temporary file), so a step runs
only the last tokens through the blocks (:func:`hdopt.lm.read_path.read_path_losses`), ``1 + 2N`` copies
of them at once, and estimates the adapters' gradient from the copies' losses
(:class:`hdopt.finetune.read_node_perturbation.ReadNodePerturbation`; ``--method read-adapters-exact``, the
estimator ``coordinates``: the exact gradient, from forward differences along every bottleneck coordinate);
a torch optimizer (AdamW) applies it. One copy of a batch's last tokens through every block counts as 1/T
of a forward pass over the batch, T the training rows' mean length in tokens (a copy that starts at block
l counts (L - l)/L of that); the cache counts one forward pass a batch it ran.

Dev evaluation reads the cache (the same function of the weights: checked when the run starts, with
:func:`hdopt.lm.read_path.check_read_path`); the test evaluation and :func:`hdopt.finetune.load_trained` run
the whole model, whose hooks apply the adapters at each row's last token. Memory: the model, one batch's
cached rows, the adapters' optimizer state and the copies of one token a row (in slices of at most
:data:`hdopt.lm.read_path.ROWS_A_PASS` copies x rows a block); the run folder
keeps the adapters' trained matrix (``U`` is drawn again from the run's seed).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hdopt.finetune.batches import encode, uses_answer_loss
from hdopt.finetune.config import ConfigError, RunConfig
from hdopt.finetune.kinds.node_perturbation import EstimatedGradientKind
from hdopt.finetune.kinds.top_block import CachedRows, accuracy_from_cache
from hdopt.finetune.read_node_perturbation import COORDINATES, ReadNodePerturbation
from hdopt.lm.evaluation import EvalResult
from hdopt.lm.read_adapters import ATTRIBUTE, read_adapters_of
from hdopt.lm.read_path import (
    Context,
    ContextCache,
    check_batch,
    check_read_path,
    read_path_losses,
    read_path_scores,
)
from hdopt.lm.scoring import OptionBatch
from hdopt.lm.tasks import Example, Task
from hdopt.lm.top_blocks import TopBlocksError

DOWN = f"{ATTRIBUTE}.down"


@dataclass
class ReadMicroBatch:
    """A micro-batch's rows and their cached context; calling it gives the unperturbed loss."""

    model: torch.nn.Module
    batch: OptionBatch
    bottom: Context

    def __call__(self) -> torch.Tensor:
        with torch.no_grad():
            losses = read_path_losses(self.model, self.bottom, self.batch)[0]
            return losses.sum() / (self.batch.labels != -100).sum().clamp_min(1)


class ReadAdaptersKind(CachedRows, EstimatedGradientKind):
    """Forward-only gradient estimates of read-position adapters, applied by a torch optimizer."""

    name = "np-read"
    how = "node perturbation of read-position adapters (forward passes only)"
    exact_coordinates = True

    @classmethod
    def check(cls, cfg: RunConfig, task: Task) -> None:
        super().check(cfg, task)  # the loss only: accuracy and F1 are not differentiable
        if uses_answer_loss(task) or not task.label_words:
            raise ConfigError(f"task {task.name!r} has no label words: read-position adapters train a "
                              "classifier read at the prompt's last token; use node-perturbation, mezo or "
                              "ft")  # fmt: skip
        if cfg.method.estimator == COORDINATES and (cfg.method.q is not None or cfg.method.noise is not None):
            given = f"--q {cfg.method.q}" if cfg.method.q is not None else f"--noise {cfg.method.noise}"
            raise ConfigError(f"--estimator coordinates perturbs every one of the adapters' L x r bottleneck "
                              f"coordinates by eps, so {given} (given, or the method's default) does not "
                              f"apply: use --method read-adapters-exact, which leaves it out")  # fmt: skip
        if cfg.method.estimator != COORDINATES and cfg.method.q is None:
            raise ConfigError(f"--estimator {cfg.method.estimator} needs --q, the number of directions")

    def __init__(self, run) -> None:
        if [name for name, _ in run.params] != [DOWN]:
            raise ConfigError(f"read-position adapters train {DOWN} alone (the read adapter); this run "
                              f"trains {sorted(n for n, _ in run.params)[:4]}...")  # fmt: skip
        read_adapters_of(run.model)
        m, o = run.cfg.method, run.cfg.optim
        self.run = run
        self.estimator = ReadNodePerturbation(run.model, DOWN, m.q, o.eps, m.noise, m.estimator)
        self.steps_taken = 0
        start = time.perf_counter()
        self.cache = ContextCache(run.model, tempfile.gettempdir())
        train = list(run.splits.train)
        self.cached_batches, tokens = self._fill(train)
        self.row_tokens = tokens / max(1, len(train))  # a copy of the last tokens: 1/T of a forward pass
        self.cached_batches += self._fill(list(run.splits.dev))[0]
        self.cache_seconds = time.perf_counter() - start
        super().__init__(run)

    def _encode(self, examples: Sequence[Example]) -> OptionBatch:
        run = self.run
        batch = encode(run.task, run.tokenizer, examples, run.cfg.data.max_length, run.device)
        try:
            check_batch(batch)
        except TopBlocksError as err:
            raise ConfigError(f"task {run.task.name!r}: {err}") from None
        return batch

    def _fill(self, examples: Sequence[Example]) -> tuple[int, int]:
        """Cache the context of ``examples``' rows; returns (batches the model ran on, their tokens)."""
        size, batches, tokens = self.run.cfg.train.eval_batch_size, 0, 0
        for first in range(0, len(examples), size):
            batch = self._encode(examples[first : first + size])
            if first == 0 and len(self.cache) == 0:
                try:
                    check_read_path(self.run.model, batch)
                except TopBlocksError as err:
                    raise ConfigError(str(err)) from None
            batches += self.cache.add(batch) > 0
            tokens += int(batch.attention_mask.sum())
        return batches, tokens

    def closure(self, examples: Sequence[Example]) -> ReadMicroBatch:
        batch = self._cached(examples)
        return ReadMicroBatch(self.run.model, batch, self.cache.context(batch))

    def passes_per_step(self) -> tuple[float, float]:
        copies = self.estimator.path_copies * self.run.cfg.train.grad_accum
        return copies / self.row_tokens, 0

    @torch.no_grad()
    def evaluate(self, examples: Sequence[Example]) -> EvalResult:
        """Dev accuracy from the cached context (the whole model's predictions: see the module docstring)."""

        def predicted(batch: OptionBatch) -> torch.Tensor:
            return read_path_scores(self.run.model, self.cache.context(batch), batch)[0].argmax(1)

        return accuracy_from_cache(examples, self.run.cfg.train.eval_batch_size, self._cached, predicted)

    def results(self) -> dict:
        """The cache's size (in its temporary file), build time and forward passes; the adapters' rank."""
        return {
            "read_rank": read_adapters_of(self.run.model).rank,
            "cache_rows": len(self.cache), "cache_bytes": self.cache.nbytes,
            "cache_mib": round(self.cache.nbytes / 2**20, 1),
            "cache_seconds": round(self.cache_seconds, 2), "cache_forwards": self.cached_batches,
            "mean_row_tokens": round(self.row_tokens, 2),
        }  # fmt: skip

