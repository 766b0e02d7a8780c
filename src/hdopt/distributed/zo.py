"""Data-parallel forward-only (zeroth-order) training: only q scalars per step cross the network.

Every rank holds the same weights and the same seed, so it draws the same directions ``z_1..z_q``
(:mod:`hdopt.zo.noise` is counter-based). Rank r evaluates the SPSA differences on its shard of the batch,
``g_i^r = (L_r(theta + eps z_i) - L_r(theta - eps z_i)) / (2 eps)``; the ranks all-reduce the q numbers,
``g_i = (1/N) sum_r g_i^r`` (8 q bytes), and apply the same update. Because the batch loss is the mean of the
shard losses, this is the one-process step on the whole batch (equal shard sizes), up to rounding.

The mechanism is the ``reduce_grads`` hook of :class:`hdopt.zo.ZOOptimizer`, which ``step()`` calls on the
per-direction projected gradients before the update; :func:`make_data_parallel_zo` installs it.
"""

from __future__ import annotations

import torch
from torch import nn

from hdopt.distributed.comm import Communicator
from hdopt.distributed.consistency import check_consistent, fingerprint
from hdopt.zo import ZOConservative, ZOOptimizer


class ProjectedGradAllReduce:
    """``reduce_grads`` / ``reduce_losses`` hook: the mean of a few scalars over ranks (one all-reduce).

    Used for the q projected gradients of every step and, for ``ZOConservative``, for its three candidate
    losses (so every rank keeps the candidate that is best on the whole batch).

    Attributes:
        comm: the communicator.
        bytes: payload all-reduced so far (8 q per step when the world has more than one rank).
        steps: number of reductions.
    """

    def __init__(self, comm: Communicator):
        self.comm = comm
        self.bytes = 0
        self.steps = 0

    def __call__(self, grads: list[float]) -> list[float]:
        self.steps += 1
        if not self.comm.active:
            return list(grads)
        t = torch.tensor(grads, dtype=torch.float64, device=self.comm.device)
        self.bytes += t.numel() * t.element_size()
        self.comm.all_reduce_sum_(t, f"ZO scalar all-reduce (call {self.steps - 1})")
        return (t / self.comm.world_size).tolist()


def make_data_parallel_zo(optimizer: ZOOptimizer, comm: Communicator | None = None,
                          model: nn.Module | None = None, config: object = None) -> ZOOptimizer:
    """Make a :mod:`hdopt.zo` optimizer data-parallel over ``comm``'s ranks (in place; returns it).

    At start-up the ranks compare the optimizer (class, hyperparameters, seed, eps, q, noise), the model
    layout and initial weights (when ``model`` is given) and ``config``; any difference raises
    :class:`~hdopt.distributed.comm.ConfigMismatchError` on every rank.

    Args:
        optimizer: any :mod:`hdopt.zo` optimizer (for ``ZOConservative`` the candidate losses are
            averaged over ranks too: 24 more bytes per step).
        comm: the communicator (None: the default process group, or one process).
        model: the model being trained, to check that all ranks start from the same weights.
        config: the run's config (any dataclass or JSON-able object), checked for equality.

    Returns:
        ``optimizer``, whose ``step()`` now averages the projected gradients over ranks. Each rank must
        feed it its own shard of the batch (:func:`hdopt.distributed.shard_batch`).
    """
    if not isinstance(optimizer, ZOOptimizer):
        raise TypeError(f"expected an hdopt.zo optimizer, got {type(optimizer).__name__}; for "
                        "backprop optimizers use torch.nn.parallel.DistributedDataParallel or "
                        "hdopt.distributed.LocalSGD")
    if isinstance(optimizer.__dict__.get("reduce_grads"), ProjectedGradAllReduce):
        raise ValueError("this optimizer is already data-parallel")
    comm = comm if comm is not None else Communicator()
    check_consistent(fingerprint(config, model, optimizer), comm, "data-parallel ZO")
    optimizer.reduce_grads = ProjectedGradAllReduce(comm)
    if isinstance(optimizer, ZOConservative):
        optimizer.reduce_losses = optimizer.reduce_grads
    return optimizer
