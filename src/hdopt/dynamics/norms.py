"""Weight norms, angular updates, effective and intrinsic learning rates (works on any torch model).

For a scale-invariant weight w (the loss satisfies L(c w) = L(w) for c > 0), SGD with learning rate eta and
weight decay lambda only changes the *direction* of w in a way that depends on

* the effective learning rate  eta_eff = eta / ||w||^2  (Hoffer et al. 2018; van Laarhoven 2017), and
* the intrinsic learning rate  lambda_e = eta * lambda  (Li, Lyu & Arora, NeurIPS 2020), which sets the
  equilibrium: the RMS angular update per step tends to sqrt(2 * eta * lambda) and ||w|| to a value
  proportional to (eta / lambda)^(1/4).

:class:`NormMonitor` is the callback form: call ``monitor.update()`` after each optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch


def weight_norm(tensors: Iterable[torch.Tensor]) -> float:
    """Euclidean norm of several tensors taken as one vector."""
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors))


def angular_update(before: Iterable[torch.Tensor], after: Iterable[torch.Tensor]) -> float:
    """Angle (radians) between two states of the same weights, each taken as one vector.

    Computed as ``atan2(||a x b||, a.b)`` via ``||a||^2 ||b||^2 - (a.b)^2`` in float64, accurate for tiny
    angles.

    Args:
        before, after: matching tensors.

    Returns:
        The angle in [0, pi].
    """
    dot = aa = bb = 0.0
    for a, b in zip(before, after, strict=True):
        a, b = a.detach().double(), b.detach().double()
        dot += float((a * b).sum())
        aa += float((a * a).sum())
        bb += float((b * b).sum())
    # ||a||^2 ||b||^2 - (a.b)^2 = ||a||^2 ||b - proj_a b||^2, computed without cancellation below
    if aa == 0.0 or bb == 0.0:
        return 0.0
    cross_sq = 0.0
    scale = dot / aa
    for a, b in zip(before, after, strict=True):
        cross_sq += float((b.detach().double() - scale * a.detach().double()).pow(2).sum())
    return math.atan2(math.sqrt(cross_sq * aa), dot)


def effective_lr(lr: float, norm: float) -> float:
    """Effective learning rate ``lr / ||w||^2`` of a scale-invariant weight with norm ``||w||``."""
    return lr / norm**2


def intrinsic_lr(lr: float, weight_decay: float) -> float:
    """Intrinsic learning rate ``lambda_e = lr * weight_decay`` (Li, Lyu & Arora 2020)."""
    return lr * weight_decay


def equilibrium_angular_update(lr: float, weight_decay: float) -> float:
    """Predicted equilibrium angular update per step, ``sqrt(2 * lr * weight_decay)`` (plain SGD, no
    momentum)."""
    return math.sqrt(2.0 * lr * weight_decay)


class NormMonitor:
    """Callback that records, per named group of tensors, the norm and the angular update of each step.

    Args:
        groups: ``{name: [tensors]}`` (each group is treated as one vector), or a ``torch.optim.Optimizer``
            (one group per ``param_groups`` entry, named ``group0``, ``group1``, ...).

    Call :meth:`update` after every optimizer step; it returns and appends
    ``{"<name>/norm": ..., "<name>/angle": ..., "<name>/eff_lr": ...}`` (eff_lr needs the optimizer's lr,
    so it is only present when the monitor was built from an optimizer).
    """

    def __init__(self, groups: Mapping[str, Iterable[torch.Tensor]] | torch.optim.Optimizer):
        self._optimizer = groups if isinstance(groups, torch.optim.Optimizer) else None
        if self._optimizer is not None:
            self.groups = {f"group{i}": list(g["params"]) for i, g in enumerate(self._optimizer.param_groups)}
        else:
            self.groups = {name: list(ts) for name, ts in groups.items()}
        self._previous = self._snapshot()
        self.history: list[dict[str, float]] = []

    def _snapshot(self) -> dict[str, list[torch.Tensor]]:
        return {name: [t.detach().clone() for t in ts] for name, ts in self.groups.items()}

    def update(self) -> dict[str, float]:
        """Measure the step just taken: norms, angles since the previous call, effective lrs."""
        record: dict[str, float] = {}
        for i, (name, tensors) in enumerate(self.groups.items()):
            norm = weight_norm(tensors)
            record[f"{name}/norm"] = norm
            record[f"{name}/angle"] = angular_update(self._previous[name], tensors)
            if self._optimizer is not None:
                record[f"{name}/eff_lr"] = effective_lr(self._optimizer.param_groups[i]["lr"], norm)
        self._previous = self._snapshot()
        self.history.append(record)
        return record
