"""Hyperparameter transforms that keep training dynamics (their SDE) fixed when the batch size changes.

When the batch size grows from B to kappa*B (and the number of steps shrinks by kappa):

* linear rule (SGD; Goyal et al. 2017, justified by the SGD SDE):  lr -> kappa * lr.
* square-root rule (Adam / RMSprop; Malladi, Lyu, Panigrahi & Arora, NeurIPS 2022):
  lr -> sqrt(kappa) * lr,  (1 - beta) -> kappa * (1 - beta) for every beta (Adam's betas, RMSprop's alpha),
  eps -> eps / sqrt(kappa).

Weight decay given as an L2 term of the loss (torch's ``weight_decay`` in SGD/Adam/RMSprop) is part of the
loss and stays unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

RULES = ("linear", "sqrt")


def steps_for_batch(steps: int, kappa: float) -> int:
    """Number of steps that sees the same number of examples after the batch grows kappa times."""
    return max(1, round(steps / kappa))


def scale_hparams(opt_config: Mapping[str, Any] | Any, kappa: float, rule: str = "linear") -> Any:
    """Transform an optimizer config for a batch ``kappa`` times larger.

    Args:
        opt_config: a mapping (e.g. ``{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}``) or a dataclass with
            such fields. Keys used: ``lr`` (required); for ``sqrt`` also ``betas``, ``alpha`` (RMSprop's
            smoothing constant) and ``eps`` when present. Other keys pass through.
        kappa: batch-size multiplier (> 0).
        rule: ``"linear"`` (lr * kappa) or ``"sqrt"`` (the square-root rule above).

    Returns:
        A new dataclass (for a dataclass input) or dict with transformed values; the input is not modified.
    """
    if rule not in RULES:
        raise ValueError(f"unknown scaling rule {rule!r}; choose one of {', '.join(RULES)}")
    if not kappa > 0:
        raise ValueError(f"kappa must be positive, got {kappa}")
    is_dataclass = dataclasses.is_dataclass(opt_config) and not isinstance(opt_config, type)
    values = dataclasses.asdict(opt_config) if is_dataclass else dict(opt_config)
    if "lr" not in values:
        raise ValueError("the optimizer config needs an 'lr' entry")
    new = dict(values)
    if rule == "linear":
        new["lr"] = values["lr"] * kappa
    else:
        root = math.sqrt(kappa)
        new["lr"] = values["lr"] * root
        if "betas" in values:
            new["betas"] = tuple(_scale_beta(b, kappa) for b in values["betas"])
        if "alpha" in values:
            new["alpha"] = _scale_beta(values["alpha"], kappa)
        if "eps" in values:
            new["eps"] = values["eps"] / root
    return dataclasses.replace(opt_config, **new) if is_dataclass else new


def _scale_beta(beta: float, kappa: float) -> float:
    """``1 - beta -> kappa * (1 - beta)``; it must stay a valid decay rate."""
    scaled = 1.0 - kappa * (1.0 - beta)
    if not 0.0 <= scaled < 1.0:
        raise ValueError(f"the square-root rule maps beta={beta} to {scaled} for kappa={kappa}: "
                         f"kappa * (1 - beta) must be at most 1; use a smaller kappa")
    return scaled
