"""Node perturbation on the last block's readout maps: forward passes only, the bottom's states cached.

The method ``node-perturbation`` trains the last block's query and output projections and its MLP (the
``readout`` adapter, :mod:`hdopt.lm.readout`). A step estimates their gradients from forward passes alone
(:class:`hdopt.finetune.node_perturbation.NodePerturbation`: perturbed outputs of those maps at the positions
the loss reads, ``1 + 2N`` copies of them in one forward of the last block) and hands the estimate to a
torch optimizer (AdamW by default), as a backprop step hands it the gradient. The frozen bottom's states
are cached when the run starts, as with ``--zo-blocks 1`` (:class:`~.top_block.CachedBottom`); one copy of
the read positions counts 1/L of a forward pass, as one loss evaluation of ``--zo-blocks 1`` does.

Memory: the inference of the last block at the read positions for ``1 + 2N`` copies, the maps' inputs there
(one copy), the estimate (the size of the trained maps) and the optimizer's state (AdamW: twice their size);
no activations are kept for a backward pass. The run folder keeps the trained maps' weights (their update
depends on the data's activations, not on seeds and scalars alone, so there is no trajectory to replay).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hdopt.finetune.batches import uses_answer_loss
from hdopt.finetune.config import ConfigError, RunConfig
from hdopt.finetune.errors import DivergenceError
from hdopt.finetune.kinds.backprop import run_optimizer
from hdopt.finetune.kinds.base import MethodKind
from hdopt.finetune.kinds.top_block import CachedBottom
from hdopt.finetune.node_perturbation import NodePerturbation
from hdopt.lm.readout import readout_modules
from hdopt.lm.scoring import OptionBatch
from hdopt.lm.tasks import Example, Task
from hdopt.lm.top_blocks import TopBlocks, top_classification_loss
from hdopt.zo.noise import derive_key


@dataclass
class MicroBatch:
    """A micro-batch's rows and their cached bottom states; calling it gives the unperturbed loss."""

    blocks: TopBlocks
    batch: OptionBatch
    bottom: torch.Tensor

    def __call__(self) -> torch.Tensor:
        with torch.no_grad():
            return top_classification_loss(self.blocks, self.bottom, self.batch)


class EstimatedGradientKind(MethodKind):
    """A kind whose step hands a forward-only gradient estimate to a torch optimizer (AdamW by default), as
    a backprop step hands it the gradient. Subclasses set ``estimator`` (its ``estimate(bottom, batch,
    key)`` returns an :class:`~hdopt.finetune.node_perturbation.Estimate`) and make closures with the
    ``bottom`` and ``batch`` it reads; micro-batch ``i`` of step ``t`` gets its own directions."""

    steps_taken: int

    def build_optimizer(self) -> torch.optim.Optimizer:
        return run_optimizer(self.run)

    def step(self, closures: Sequence[MicroBatch]) -> float:
        """Estimate on each micro-batch (its own directions), average, check, then one optimizer step."""
        params, total = dict(self.run.params), 0.0
        self.optimizer.zero_grad(set_to_none=True)
        for index, micro in enumerate(closures):
            key = derive_key(self.run.cfg.train.seed, self.steps_taken, index)
            estimate = self.estimator.estimate(micro.bottom, micro.batch, key)
            if not math.isfinite(estimate.loss):
                self.optimizer.zero_grad(set_to_none=True)
                raise DivergenceError(f"the loss is {estimate.loss}; the weights were not updated")
            total += estimate.loss
            for name, g in estimate.grads.items():  # accumulated in place: no buffer besides the gradients
                p = params[name]
                g.div_(len(closures))
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_taken += 1
        return total / len(closures)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "steps_taken": self.steps_taken}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.steps_taken = state["steps_taken"]


class NodePerturbationKind(CachedBottom, EstimatedGradientKind):
    """Forward-only gradient estimates of the last block's readout maps, applied by a torch optimizer."""

    name = "np"
    how = "node perturbation (forward passes only)"

    @classmethod
    def variant(cls, cfg: RunConfig) -> type[MethodKind]:
        if cfg.method.zo_blocks not in (None, 1):
            raise ConfigError(f"node perturbation trains the last block (K = 1), not --zo-blocks "
                              f"{cfg.method.zo_blocks}: leave --zo-blocks out")  # fmt: skip
        return cls

    @classmethod
    def check(cls, cfg: RunConfig, task: Task) -> None:
        super().check(cfg, task)  # the loss only: accuracy and F1 are not differentiable
        if uses_answer_loss(task):
            raise ConfigError(f"task {task.name!r} is a generation task: node perturbation trains a "
                              "classifier (label words or options); use mezo or ft")  # fmt: skip

    def __init__(self, run) -> None:
        blocks = TopBlocks(run.model, 1)
        blocks.check()
        if not blocks.fast:
            raise ConfigError(f"{type(blocks.inner).__name__}: node perturbation needs a Llama-style last "
                              "block (Llama, Mistral, Qwen2, Gemma, SmolLM2)")  # fmt: skip
        modules = readout_modules(run.model)  # the readout adapter found them already: they exist
        expected = {f"{name}.{leaf}" for name, m in modules.items() for leaf, _ in m.named_parameters()}
        if {name for name, _ in run.params} != expected:
            raise ConfigError("node perturbation trains exactly the readout maps (the readout adapter); "
                              f"this run trains {sorted(n for n, _ in run.params)[:4]}...")  # fmt: skip
        m, o = run.cfg.method, run.cfg.optim
        self.estimator = NodePerturbation(blocks, modules, m.q, o.eps, m.noise, m.estimator)
        self.steps_taken = 0
        self._cache_bottom(run, blocks)
        super().__init__(run)

    def closure(self, examples: Sequence[Example]) -> MicroBatch:
        batch = self._cached(examples)
        return MicroBatch(self.blocks, batch, self.cache.hidden(batch))

    def passes_per_step(self) -> tuple[float, float]:
        copies = self.estimator.copies * self.run.cfg.train.grad_accum
        return copies * self.blocks.fraction, 0
