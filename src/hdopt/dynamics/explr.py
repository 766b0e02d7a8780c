"""The exponential learning-rate schedule equivalent to weight decay (Li & Arora, ICLR 2020).

On a scale-invariant loss, SGD with constant lr eta, weight decay lambda and heavy-ball momentum gamma
(torch convention: v <- gamma v + g + lambda w, w <- w - eta v) gives the same network functions as SGD with
momentum gamma, *no* weight decay and the schedule

    eta_t = eta * alpha^(-2t - 1),   alpha the larger root of  x^2 - (1 + gamma - lambda eta) x + gamma = 0

(gamma = 0: alpha = 1 - lambda eta). The weights differ only by scale: w_t = alpha^t * w~_t. With momentum the
equivalent run must start with momentum buffer v_0 = (alpha - 1) / (eta alpha) * w_0 (it encodes
w~_{-1} = alpha w_0); :func:`make_explr_sgd` sets it up.

Derivation: substitute w_t = alpha^t w~_t into w_{t+1} = (1 + gamma - eta lambda) w_t - gamma w_{t-1} - eta
grad L(w_t) and use grad L(c w) = grad L(w) / c; the result is momentum SGD on w~ with momentum gamma /
alpha^2 in the "position" form, which is torch's momentum gamma under the lr ratio eta_t / eta_{t-1} =
alpha^(-2).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def explr_alpha(lr: float, weight_decay: float, momentum: float = 0.0) -> float:
    """The larger root alpha of ``x^2 - (1 + momentum - lr * weight_decay) x + momentum = 0``.

    Args:
        lr, weight_decay, momentum: eta, lambda, gamma of the weight-decay run.

    Returns:
        alpha in (0, 1] (1 when weight_decay is 0).
    """
    b = 1.0 + momentum - lr * weight_decay
    disc = b * b - 4.0 * momentum
    if disc < 0:
        raise ValueError(f"no real alpha for lr={lr}, weight_decay={weight_decay}, momentum={momentum}: "
                         "(1 + gamma - eta*lambda)^2 < 4 gamma; lower lr * weight_decay")
    alpha = (b + math.sqrt(disc)) / 2.0
    if alpha <= 0:
        raise ValueError(f"lr * weight_decay = {lr * weight_decay} is too large (alpha = {alpha} <= 0)")
    return alpha


def explr_factor(step: int, alpha: float) -> float:
    """Multiplier ``alpha^(-2 step - 1)`` of the base lr at ``step`` (0-based)."""
    return alpha ** (-2 * step - 1)


def make_explr_sgd(params: Iterable[torch.Tensor], lr: float, weight_decay: float, momentum: float = 0.0
                   ) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """SGD without weight decay plus the exponential schedule equivalent to ``SGD(lr, momentum,
    weight_decay)``.

    Call ``optimizer.step()`` then ``scheduler.step()`` once per iteration, as usual.

    Args:
        params: the scale-invariant parameters (their current values are w_0).
        lr, weight_decay, momentum: the weight-decay run to imitate.

    Returns:
        ``(optimizer, scheduler)``; with momentum the buffers are pre-seeded with ``(alpha-1)/(lr alpha)
        w_0``.
    """
    params = list(params)
    alpha = explr_alpha(lr, weight_decay, momentum)
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: explr_factor(t, alpha))
    if momentum:
        for p in params:
            optimizer.state[p]["momentum_buffer"] = (alpha - 1.0) / (lr * alpha) * p.detach().clone()
    return optimizer, scheduler
