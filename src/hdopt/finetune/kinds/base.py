"""The method-kind contract: how a method trains, as one object per run that the trainer's loop drives.

A kind builds the run's optimizer and schedule, turns a batch of examples into a closure, takes one
optimizer step on the closures of a step's micro-batches, says what a step costs in forward and backward
passes, evaluates the current weights on dev, and owns whatever it keeps besides the weights (its state in
the checkpoint, its files in the run folder). The loop itself (:mod:`hdopt.finetune.trainer`) knows none of
this: it calls these methods.

A kind is attached to registered methods (:class:`hdopt.finetune.methods.Method`); a new way of training is
a subclass in a module of its own and one ``register_method`` line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from hdopt.finetune.batches import check_objective
from hdopt.finetune.checkpoint import load_weights_from
from hdopt.finetune.optimizers import build_scheduler

if TYPE_CHECKING:
    from hdopt.finetune.config import RunConfig
    from hdopt.finetune.trainer import Setup
    from hdopt.lm.evaluation import EvalResult
    from hdopt.lm.tasks import Example, Task

Closure = Callable[[], torch.Tensor]


class MethodKind:
    """How a method trains (the base class: what every kind provides; see the module docstring).

    Class attributes:
        name: ``zo``, ``fo``, ``lp``, ... (recorded in config.json's ``method_record``).
        how: the way it trains, for messages ("backprop").
        data_parallel: whether it can run on several processes (torchrun).
        takes_steps: False for a closed-form fit (the logistic-regression probe), which :meth:`fit` runs.
        any_objective: whether it can train on non-differentiable objectives (accuracy, F1).
        exact_coordinates: whether it takes ``--estimator coordinates`` (read-position adapters' exact
            forward differences).
    """

    name: ClassVar[str] = ""
    how: ClassVar[str] = ""
    data_parallel: ClassVar[bool] = False
    takes_steps: ClassVar[bool] = True
    any_objective: ClassVar[bool] = False
    exact_coordinates: ClassVar[bool] = False

    def __init__(self, run: Setup) -> None:
        self.run = run
        self.optimizer = self.build_optimizer() if self.takes_steps else None
        t, o = run.cfg.train, run.cfg.optim
        self.scheduler = build_scheduler(self.optimizer, o.schedule, t.steps) if self.optimizer else None

    @classmethod
    def variant(cls, cfg: RunConfig) -> type[MethodKind]:
        """The kind that trains ``cfg`` (this one, or a variant of it chosen by the config)."""
        if cfg.method.zo_blocks is not None:
            from hdopt.finetune.config import ConfigError

            raise ConfigError(f"--zo-blocks trains with forward passes only; {cls.how} cannot: use a ZO "
                              "method (mezo, mezo-lora)")  # fmt: skip
        return cls

    @classmethod
    def check(cls, cfg: RunConfig, task: Task) -> None:
        """Refuse, before anything is loaded, what this kind cannot train."""
        check_objective(task, cfg.method.objective, cls.any_objective)
        if cfg.method.estimator == "coordinates" and not cls.exact_coordinates:
            from hdopt.finetune.config import ConfigError

            raise ConfigError(f"--estimator coordinates (forward differences along every bottleneck "
                              f"coordinate) is read-position adapters' alone (--method read-adapters-exact); "
                              f"this method ({cls.how}) takes central or one-sided")  # fmt: skip

    # -- what the loop calls -----------------------------------------------------------------------------
    def build_optimizer(self) -> torch.optim.Optimizer:
        raise NotImplementedError

    def closure(self, examples: Sequence[Example]) -> Closure:
        """The objective on a batch of ``examples``, as a closure (the run's, from :mod:`.batches`)."""
        return self.run.objective(examples)

    def step(self, closures: Sequence[Closure]) -> float:
        """One optimizer step on the closures of the step's micro-batches; returns the step's loss."""
        raise NotImplementedError

    def passes_per_step(self) -> tuple[float, float]:
        """``(forward passes, backward passes)`` over a micro-batch that one step costs."""
        raise NotImplementedError

    def training_mode(self) -> bool:
        """Whether the model runs in training mode (dropout) during the steps."""
        return False

    def evaluate(self, examples: Sequence[Example]) -> EvalResult:
        """The dev evaluation of the current weights (the test evaluation is always the whole model's)."""
        return self.run.evaluate(examples)

    # -- what it keeps -------------------------------------------------------------------------------------
    def keeps_weights(self) -> bool:
        """Whether checkpoints and best.safetensors hold the trainable weights (else it rebuilds them)."""
        return True

    def restore(self, checkpoint: Path, state: dict[str, Any], meta: dict[str, Any]) -> None:
        """Bring the run's weights and the kind's state to a checkpoint's (``state`` and ``meta`` read from
        it; its weights, when it holds them, are copied from the file one tensor at a time)."""
        load_weights_from(checkpoint, self.run.params)
        self.load_state_dict(state)

    def state_dict(self) -> dict[str, Any]:
        """Its part of the resume checkpoint: optimizer and scheduler state."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save_files(self, folder: Path) -> None:
        """Write the files it keeps in the run folder besides the checkpoint (none by default)."""

    def check_files(self, folder: Path, step: int) -> None:
        """On resume, after its state was restored from the checkpoint of ``step``: check its own files."""

    def results(self) -> dict[str, Any]:
        """What it adds to results.json (nothing by default)."""
        return {}

    def fit(self) -> tuple[dict, Path]:
        """A kind that takes no steps fits here and writes its run folder; returns ``(results, folder)``."""
        raise NotImplementedError
