"""SVAG: Stochastic Variance Amplified Gradient (Li, Malladi & Arora, NeurIPS 2021).

SVAG with parameter l draws two independent batches, forms

    L_svag = c1 * L(batch1) + c2 * L(batch2),   c_{1,2} = (1 +- sqrt(2l - 1)) / 2,

and steps with lr eta / l, running l times as many steps. Since c1 + c2 = 1 and c1^2 + c2^2 = l, the gradient
keeps its mean and its noise covariance grows l times, so one unit of time (eta) carries the same drift and
diffusion as SGD; as l grows the iterates converge weakly to the SGD SDE
dX = -grad L(X) dt + sqrt(eta) Sigma(X)^(1/2) dW.  l = 1 is plain SGD.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch


def svag_coefficients(l: float) -> tuple[float, float]:
    """``(c1, c2) = ((1 + sqrt(2l - 1)) / 2, (1 - sqrt(2l - 1)) / 2)`` for ``l >= 1``."""
    if l < 1:
        raise ValueError(f"SVAG needs l >= 1, got {l}")
    root = math.sqrt(2 * l - 1)
    return (1 + root) / 2, (1 - root) / 2


class SVAG:
    """Wrap any optimizer so that each step is an SVAG(l) step.

    The wrapped optimizer's learning rates are divided by ``l`` at construction (and multiplied back in
    :meth:`base_lrs`); run ``l`` times as many steps to cover the same time.

    Args:
        optimizer: the base optimizer (e.g. ``torch.optim.SGD``).
        l: the variance-amplification factor (>= 1).

    Use: ``svag.step(closure)`` where ``closure()`` computes and returns the losses of two *independent*
    batches ``(loss1, loss2)`` (no backward); SVAG zeroes the gradients, back-propagates
    ``c1 * loss1 + c2 * loss2`` and steps the base optimizer. It returns the SVAG loss (a float).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, l: float):
        self.c1, self.c2 = svag_coefficients(l)
        self.l = l
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] / l

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def base_lrs(self) -> list[float]:
        """The learning rates the wrapper was built with (before the division by l)."""
        return [g["lr"] * self.l for g in self.optimizer.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> float:
        """One SVAG step; ``closure`` returns the two batch losses."""
        if closure is None:
            raise ValueError("SVAG.step needs a closure returning the losses of two independent batches")
        self.optimizer.zero_grad()
        loss1, loss2 = closure()
        loss = self.c1 * loss1 + self.c2 * loss2
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def state_dict(self) -> dict[str, Any]:
        return {"l": self.l, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["l"] != self.l:
            raise ValueError(f"state was saved with l={state['l']}, this wrapper has l={self.l}")
        self.optimizer.load_state_dict(state["optimizer"])
