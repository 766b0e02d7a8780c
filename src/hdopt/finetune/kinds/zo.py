"""Forward-only training (MeZO and successors): any :mod:`hdopt.zo` optimizer, forward passes only.

A step estimates the projected gradients on each micro-batch (the same directions for all of them) and
applies one update; the trajectory (seed and projected gradients per step, a few bytes) is the kind's own
file, from which :mod:`hdopt.finetune.replay` rebuilds the weights bitwise.

Variants override the pieces of the step, not the loop. Top-block ZO on cached activations, for example,
is a subclass that caches the frozen bottom's outputs for the training examples when it is created,
returns from :meth:`ZOKind.closure` a closure that runs only the top blocks on those cached inputs, may
answer :meth:`ZOKind.evaluate` (dev) from a cache too, and sets :attr:`ZOKind.forward_fraction` to K/L so
that a forward through K of L blocks counts K/L forward passes. The test evaluation always runs the whole
model (the trainer's), and the optimizer, the trajectory, replay and resume stay as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hdopt.finetune import rundir
from hdopt.finetune.errors import DivergenceError
from hdopt.finetune.kinds.base import Closure, MethodKind
from hdopt.finetune.optimizers import build_zo_optimizer, zo_step
from hdopt.zo import NonFiniteLossError, ZOOptimizer


class ZOKind(MethodKind):
    """Forward passes only, with the run's :mod:`hdopt.zo` optimizer (``--optimizer``, any registered)."""

    name = "zo"
    how = "forward passes only"
    data_parallel = True
    any_objective = True
    forward_fraction: float = 1.0  # the share of the model one forward pass runs (top-block variants: K/L)

    @classmethod
    def variant(cls, cfg) -> type[MethodKind]:
        """:class:`~hdopt.finetune.kinds.top_block.TopBlockZOKind` with ``--zo-blocks K``, else this kind."""
        if cfg.method.zo_blocks is None:
            return cls
        from hdopt.finetune.kinds.top_block import TopBlockZOKind

        return TopBlockZOKind

    def build_optimizer(self) -> ZOOptimizer:
        cfg, run = self.run.cfg, self.run
        m, o = cfg.method, cfg.optim
        return build_zo_optimizer(
            m.optimizer, run.params, lr=o.lr, eps=o.eps, weight_decay=o.weight_decay, q=m.q,
            estimator=m.estimator, noise=m.noise, seed=cfg.train.seed, momentum=o.momentum,
            reduce=run.workers.reduce_hook(), args=m.optimizer_args,
        )  # fmt: skip

    def step(self, closures: Sequence[Closure]) -> float:
        try:
            return zo_step(self.optimizer, closures)
        except NonFiniteLossError as err:  # every rank raises it at the same step (the reduce contract)
            raise DivergenceError(str(err)) from None

    def passes_per_step(self) -> tuple[float, float]:
        forwards = self.optimizer.forwards_per_step(self.run.cfg.train.grad_accum)
        return (forwards if self.forward_fraction == 1.0 else forwards * self.forward_fraction), 0

    def save_files(self, folder: Path) -> None:
        self.optimizer.save_trajectory(folder / rundir.TRAJECTORY)
