"""Forward-only training (MeZO and successors): any :mod:`hdopt.zo` optimizer, forward passes only.

A step estimates the projected gradients on each micro-batch (the same directions for all of them) and
applies one update; the trajectory (seed and projected gradients per step, a few bytes) is the kind's own
file, from which :mod:`hdopt.finetune.replay` rebuilds the weights bitwise.

By default the run folder holds no weights: a checkpoint is the optimizer's state without its per-parameter
buffers (step count, trajectory), the scheduler, RNG and loop state, and the sha256 of the weights at its
step. Resume replays the trajectory from the starting model (checked against the run's digest of it) in the
run's own optimizer, which rebuilds the weights and any buffers (momentum, Adam moments), and checks the
result against that sha256. ``keep_weights`` stores the weights as well (resume then loads them).

Variants override the pieces of the step, not the loop. Top-block ZO on cached activations, for example,
is a subclass that caches the frozen bottom's outputs for the training examples when it is created,
returns from :meth:`ZOKind.closure` a closure that runs only the top blocks on those cached inputs, may
answer :meth:`ZOKind.evaluate` (dev) from a cache too, and sets :attr:`ZOKind.forward_fraction` to K/L so
that a forward through K of L blocks counts K/L forward passes. The test evaluation always runs the whole
model (the trainer's), and the optimizer, the trajectory, replay and resume stay as they are.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hdopt.finetune import rundir
from hdopt.finetune.checkpoint import tensors_digest
from hdopt.finetune.errors import DivergenceError, RunFolderError
from hdopt.finetune.kinds.base import Closure, MethodKind
from hdopt.finetune.optimizers import build_zo_optimizer, zo_step
from hdopt.zo import NonFiniteLossError, Trajectory, ZOOptimizer


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

    def keeps_weights(self) -> bool:
        return self.run.cfg.train.keep_weights

    def state_dict(self) -> dict[str, Any]:
        """Without ``keep_weights``: the optimizer state less its per-parameter buffers (replay rebuilds)."""
        state = super().state_dict()
        if not self.keeps_weights():
            optimizer = state["optimizer"]
            state["optimizer"] = {**optimizer, "state": {"zo": optimizer["state"]["zo"]}}
        return state

    def restore(self, checkpoint: Path, state: dict[str, Any], meta: dict[str, Any]) -> None:
        """Load the weights, or replay the checkpoint's trajectory from the starting weights in this optimizer
        (weights and per-parameter buffers rebuilt), then check them against the checkpoint's sha256."""
        if meta.get("weights", "kept") == "kept":  # files of older versions always hold the weights
            super().restore(checkpoint, state, meta)
            return
        saved = state["optimizer"]
        zo = saved["state"]["zo"]
        raw = zo["trajectory"].to(torch.uint8).numpy().tobytes()
        for record in Trajectory.unpack(raw, *zo["trajectory_layout"], where="the checkpoint's trajectory"):
            self.optimizer.apply_update(record)
        rebuilt = self.optimizer.state_dict()  # the replay's per-parameter buffers, the saved rest
        self.optimizer.load_state_dict({**saved, "state": {**rebuilt["state"], "zo": zo}})
        self.scheduler.load_state_dict(state["scheduler"])
        if tensors_digest(self.run.params) != meta.get("weights_sha256"):
            raise RunFolderError(
                f"replaying the trajectory to step {self.optimizer.step_count} did not rebuild the weights "
                "the run had (their sha256 differs): the run was trained with other library versions or "
                "hardware (rerun it here, or resume with the versions that trained it)"
            )

    def save_files(self, folder: Path) -> None:
        rundir.save_trajectory(self.optimizer, folder / rundir.TRAJECTORY)

    def check_files(self, folder: Path, step: int) -> None:
        """trajectory.bin must hold at least the checkpoint's steps, as the checkpoint's own copy has them;
        a damaged or short file is named and rewritten from that copy."""
        path = folder / rundir.TRAJECTORY
        try:
            records = list(rundir.load_trajectory(path)[1])[:step]
            problem = None if records == list(self.optimizer.trajectory) else "it differs from the checkpoint"
        except (RunFolderError, FileNotFoundError) as err:
            problem = str(err)
        if problem:
            print(f"warning: {path}: {problem}; rewritten from the checkpoint's copy (step {step})",
                  file=sys.stderr)  # fmt: skip
            self.save_files(folder)
