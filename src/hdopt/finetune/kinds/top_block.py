"""Top-block ZO on cached activations (``--zo-blocks K``): forward-only training of the top K blocks only.

The frozen bottom (embeddings and blocks ``0 .. L-K-1``) computes the same states for a training example at
every step, so they are computed once, when the run starts, for every training and dev sequence
(:class:`hdopt.lm.top_blocks.TrunkCache`); a step then runs only the top K blocks (the last one only at the
positions the loss reads), and one forward pass counts K/L of a whole-model forward. Any :mod:`hdopt.zo`
optimizer works, on full weights (the top blocks and the final norm) or on LoRA adapters (those inside the
top blocks). Dev evaluation reads the cache too (the same function of the weights); the test evaluation runs
the whole model, and the trajectory replays on the whole model as for any ZO run. The cache, the dev
evaluation from it and its report are :class:`CachedBottom`, which the node-perturbation kind shares.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from hdopt.finetune.batches import encode, uses_answer_loss
from hdopt.finetune.config import ConfigError, RunConfig
from hdopt.finetune.kinds.base import Closure
from hdopt.finetune.kinds.zo import ZOKind
from hdopt.lm.evaluation import EvalResult
from hdopt.lm.scoring import logprobs_from_states
from hdopt.lm.tasks import Example, Task
from hdopt.lm.top_blocks import TopBlocks, TrunkCache, top_classification_loss, top_predictions

ADAPTERS = ("full", "lora")


def accuracy_from_cache(examples: Sequence[Example], size: int, encode_batch, predicted) -> EvalResult:
    """Accuracy over ``examples`` in batches of ``size``: ``encode_batch(part)`` gives a batch (its rows
    cached), ``predicted(batch)`` the option each example's cached states predict."""
    start, records = time.perf_counter(), []
    for first in range(0, len(examples), size):
        part = examples[first : first + size]
        chosen = predicted(encode_batch(part)).tolist()
        records += [{"uid": e.uid, "prediction_index": p, "label_index": e.label, "correct": p == e.label}
                    for e, p in zip(part, chosen, strict=True)]  # fmt: skip
    accuracy = round(100.0 * sum(r["correct"] for r in records) / max(1, len(records)), 2)
    return EvalResult({"accuracy": accuracy}, records, 0, time.perf_counter() - start)


class CachedRows:
    """A kind that keeps its rows' states in ``self.cache`` (``add(batch)``) and encodes with ``_encode``."""

    def _cached(self, examples: Sequence[Example]):
        """``examples``' batch, its rows added to the cache when missing (training rows are there already)."""
        batch = self._encode(examples)
        self.cache.add(batch)
        return batch


class CachedBottom(CachedRows):
    """What a kind that trains on the bottom's cached states has: the cache of every training (and, on
    classification tasks, dev) sequence, built when the run starts; dev evaluation from it; its size in the
    results. Mixed in before the kind's base class (:class:`TopBlockZOKind`, the node-perturbation kind)."""

    run: object
    blocks: TopBlocks

    def _cache_bottom(self, run, blocks: TopBlocks) -> None:
        self.run, self.blocks = run, blocks
        self.classification = not uses_answer_loss(run.task)  # dev evaluation from the cache
        self.cache = TrunkCache(blocks)
        start = time.perf_counter()
        cached = list(run.splits.train) + (list(run.splits.dev) if self.classification else [])
        self.cached_batches = self._fill(cached)
        self.cache_seconds = time.perf_counter() - start

    def _encode(self, examples: Sequence[Example]):
        """The rows the loss reads (:func:`hdopt.finetune.batches.encode`, the whole model's encoding)."""
        run = self.run
        return encode(run.task, run.tokenizer, examples, run.cfg.data.max_length, run.device)

    def _fill(self, examples: Sequence[Example]) -> int:
        """Cache the bottom states of ``examples``' rows; returns the number of batches the bottom ran on."""
        size, batches = self.run.cfg.train.eval_batch_size, 0
        with torch.no_grad():
            for start in range(0, len(examples), size):
                self.cache.add(self._encode(examples[start : start + size]))
                batches += 1
        return batches

    def evaluate(self, examples: Sequence[Example]) -> EvalResult:
        """Dev accuracy from the cache on classification tasks; other tasks evaluate the whole model."""
        if not self.classification:
            return super().evaluate(examples)
        was_training = self.run.model.training
        self.run.model.eval()
        try:
            return accuracy_from_cache(examples, self.run.cfg.train.eval_batch_size, self._cached,
                                       lambda batch: top_predictions(self.blocks, self.cache.hidden(batch),
                                                                     batch))  # fmt: skip
        finally:
            self.run.model.train(was_training)

    def results(self) -> dict:
        """What the results record about the cache: its size, its build time and its forward passes."""
        bottom = 1.0 - self.blocks.fraction
        return {
            "zo_blocks": self.blocks.k, "blocks": self.blocks.num_layers,
            "cache_rows": len(self.cache), "cache_bytes": self.cache.nbytes,
            "cache_mib": round(self.cache.nbytes / 2**20, 1),
            "cache_seconds": round(self.cache_seconds, 2),
            "cache_forwards": round(self.cached_batches * bottom, 3),
        }  # fmt: skip


class TopBlockZOKind(CachedBottom, ZOKind):
    """ZO on the top ``zo_blocks`` blocks, the bottom's outputs cached (see the module docstring)."""

    @classmethod
    def check(cls, cfg: RunConfig, task: Task) -> None:
        super().check(cfg, task)
        if cfg.method.objective == "f1":
            raise ConfigError("--zo-blocks trains on cached states: --objective f1 generates text with the "
                              "whole model; use --objective loss or accuracy")  # fmt: skip

    def __init__(self, run) -> None:
        cfg = run.cfg
        if run.method.adapter not in ADAPTERS:
            raise ConfigError(f"--zo-blocks trains full weights or LoRA adapters of the top blocks, not the "
                              f"{run.method.adapter!r} adapter: use mezo or mezo-lora")  # fmt: skip
        self.blocks = TopBlocks(run.model, cfg.method.zo_blocks)
        self.blocks.check()
        _train_only_the_top(run, self.blocks)
        self.forward_fraction = self.blocks.fraction
        self._cache_bottom(run, self.blocks)
        super().__init__(run)

    def closure(self, examples: Sequence[Example]) -> Closure:
        run = self.run
        batch = self._cached(examples)
        blocks, bottom = self.blocks, self.cache.hidden(batch)  # frozen: the same for every evaluation
        if run.cfg.method.objective == "accuracy":
            return lambda: -(top_predictions(blocks, bottom, batch) == batch.labels).float().mean()
        if uses_answer_loss(run.task):
            def answer_loss() -> torch.Tensor:
                states = blocks.states_at(bottom, batch.attention_mask, batch.target_seq,
                                          batch.target_pos)  # fmt: skip
                return -logprobs_from_states(blocks.inner, batch, states).mean()

            return answer_loss
        return lambda: top_classification_loss(blocks, bottom, batch)


def _train_only_the_top(run, blocks: TopBlocks) -> None:
    """Freeze every trainable parameter outside the top blocks; ``run.params`` becomes the rest."""
    top = {id(p) for _, p in blocks.top_parameters()}
    if run.method.adapter == "full":
        for _, p in blocks.top_parameters():
            p.requires_grad_(True)
    for _, p in run.model.named_parameters():
        if p.requires_grad and id(p) not in top:
            p.requires_grad_(False)
    run.params = [(name, p) for name, p in run.model.named_parameters() if p.requires_grad]
    if not run.params:
        raise ConfigError(f"--zo-blocks {blocks.k}: no trainable parameter inside the top blocks (check "
                          "--lora-targets)")
