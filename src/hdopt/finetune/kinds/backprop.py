"""Backprop training (FT, FT-LoRA, FT-prefix, head tuning): forward + backward, AdamW or SGD."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hdopt.finetune.adapters import ADAPTERS
from hdopt.finetune.kinds.base import Closure, MethodKind
from hdopt.finetune.optimizers import build_fo_optimizer, fo_step


def run_optimizer(run) -> torch.optim.Optimizer:
    """The run's torch optimizer (``--optimizer adamw|sgd``) over its trainable parameters."""
    cfg = run.cfg
    o = cfg.optim
    return build_fo_optimizer(cfg.method.optimizer, run.params, lr=o.lr, weight_decay=o.weight_decay,
                              momentum=o.momentum, args=cfg.method.optimizer_args)  # fmt: skip


class BackpropKind(MethodKind):
    """Gradients by backprop, accumulated over the micro-batches, then one optimizer step."""

    name = "fo"
    how = "backprop"

    def build_optimizer(self) -> torch.optim.Optimizer:
        return run_optimizer(self.run)

    def step(self, closures: Sequence[Closure]) -> float:
        return fo_step(self.optimizer, closures)

    def passes_per_step(self) -> tuple[float, float]:
        accum = self.run.cfg.train.grad_accum
        return accum, accum

    def training_mode(self) -> bool:
        """Dropout on, except where the adapter reads frozen features (head tuning, as a probe does)."""
        return not ADAPTERS.get(self.run.method.adapter).frozen_body
