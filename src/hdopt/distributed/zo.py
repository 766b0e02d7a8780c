"""Data-parallel forward-only (zeroth-order) training: only q scalars per step cross the network.

Every rank holds the same weights and the same seed, so it draws the same directions ``z_1..z_q``
(:mod:`hdopt.zo.noise` is counter-based). Rank r evaluates the SPSA differences on its shard of the batch,
``g_i^r = (L_r(theta + eps z_i) - L_r(theta - eps z_i)) / (2 eps)``; the ranks all-reduce the q numbers,
``g_i = (1/N) sum_r g_i^r`` (8 q bytes), and apply the same update. Because the batch loss is the mean of the
shard losses, this is the one-process step on the whole batch (equal shard sizes), up to rounding.

The mechanism is the ``reduce`` hook every :class:`hdopt.zo.ZOOptimizer` takes at construction:
:class:`ScalarAllReduce` is that hook, and :func:`data_parallel_zo` builds an optimizer with it after the
start-up check that every rank runs the same configuration from the same weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hdopt.distributed.comm import Communicator
from hdopt.distributed.consistency import check_consistent, fingerprint
from hdopt.zo import ZOOptimizer


class ScalarAllReduce:
    """The ``reduce`` hook of data-parallel ZO: the mean over ranks of a step's few scalars (one all-reduce).

    Used for the q projected gradients of every step and for any other scalars a rule reduces (the three
    candidate losses of ``ZOConservative``, so every rank keeps the candidate that is best on the whole
    batch). A rank whose own loss was not finite joins with NaN (the optimizer's contract), so every rank
    sees NaN and raises at the same step.

    Attributes:
        comm: the communicator.
        bytes: payload all-reduced so far (8 bytes a scalar when the world has more than one rank).
        steps: number of reductions.
    """

    def __init__(self, comm: Communicator | None = None):
        self.comm = comm if comm is not None else Communicator()
        self.bytes = 0
        self.steps = 0

    def __call__(self, values: Sequence[float], kind: str = "scalars") -> list[float]:
        self.steps += 1
        if not self.comm.active:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self.comm.device)
        self.bytes += t.numel() * t.element_size()
        self.comm.all_reduce_sum_(t, f"ZO {kind.replace('_', ' ')} all-reduce (call {self.steps - 1})")
        return (t / self.comm.world_size).tolist()


def data_parallel_zo(
    optimizer_cls: type[ZOOptimizer],
    params,
    comm: Communicator | None = None,
    *,
    model: nn.Module | None = None,
    config: Any = None,
    **hyperparameters,
) -> ZOOptimizer:
    """An :mod:`hdopt.zo` optimizer that trains data-parallel over ``comm``'s ranks.

    At start-up the ranks compare the optimizer (class and every hyperparameter, seed, eps, q, noise), the
    model layout and initial weights (when ``model`` is given) and ``config``; any difference raises
    :class:`~hdopt.distributed.comm.ConfigMismatchError` on every rank.

    Args:
        optimizer_cls: any :mod:`hdopt.zo` optimizer class (e.g. ``ZOSGD``).
        params: its parameters, as for the class.
        comm: the communicator (None: the default process group, or one process).
        model: the model being trained, to check that all ranks start from the same weights.
        config: the run's config (any dataclass or JSON-able object), checked for equality.
        **hyperparameters: the optimizer's (lr, eps, q, seed, ...).

    Returns:
        The optimizer; its ``reduce`` is a :class:`ScalarAllReduce` (``.bytes``, ``.steps``). Each rank must
        feed it its own shard of the batch (:func:`hdopt.distributed.shard_batch`).
    """
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, ZOOptimizer)):
        raise TypeError(
            f"expected an hdopt.zo optimizer class, got {optimizer_cls!r}; for backprop optimizers use "
            "torch.nn.parallel.DistributedDataParallel or hdopt.distributed.LocalSGD"
        )
    if "reduce" in hyperparameters:
        raise ValueError("data_parallel_zo supplies the reduce hook itself: leave `reduce` out")
    reduce = ScalarAllReduce(comm)
    optimizer = optimizer_cls(params, reduce=reduce, **hyperparameters)
    check_consistent(fingerprint(config, model, optimizer), reduce.comm, "data-parallel ZO")
    return optimizer
