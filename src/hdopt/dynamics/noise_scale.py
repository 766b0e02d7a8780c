"""Gradient noise: per-sample gradient variance against the squared norm of the mean gradient.

With per-sample gradients g_1..g_n and mean G, the signal is ``||G||^2`` and the noise is the trace of the
per-sample covariance ``tr(Sigma) = (1/(n-1)) sum_i ||g_i - G||^2``. Their ratio ``B_simple =
tr(Sigma)/||G||^2``
is the "simple" gradient noise scale (McCandlish et al. 2018), the batch size at which noise and signal in
an SGD step are equal; Li, Malladi & Arora (2021) use the same two quantities (G_t, N_t) to judge when the
SDE approximation applies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap


@dataclass
class NoiseScale:
    """``grad_sq_norm`` = ||G||^2, ``trace_cov`` = tr(Sigma), ``b_simple`` = tr(Sigma)/||G||^2, ``n``
    samples."""

    grad_sq_norm: float
    trace_cov: float
    b_simple: float
    n: int


def per_sample_grads(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     x: torch.Tensor, y: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Flat per-sample gradients ``(n, P)`` with ``torch.func.vmap`` over examples.

    The model must not mix examples (BatchNorm in train mode does; use eval mode or a model without it).

    Args:
        model: the network.
        loss_fn: ``loss_fn(output, target) -> scalar`` (mean reduction; called on batches of one).
        x, y: inputs ``(n, ...)`` and targets ``(n, ...)``.
        chunk: examples per vmap call (bounds memory).

    Returns:
        A tensor ``(n, P)``, P the number of trainable parameters.
    """
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def loss_one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))
    rows = []
    for i in range(0, len(x), chunk):
        g = per_example(params, x[i:i + chunk], y[i:i + chunk])
        rows.append(torch.cat([g[k].reshape(g[k].shape[0], -1) for k in params], dim=1))
    return torch.cat(rows)


def gradient_noise_scale(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                         x: torch.Tensor, y: torch.Tensor, chunk: int = 256) -> NoiseScale:
    """Signal ``||G||^2``, noise ``tr(Sigma)`` and their ratio from per-sample gradients on ``(x, y)``.

    Args:
        model, loss_fn, x, y, chunk: as in :func:`per_sample_grads` (at least two examples).

    Returns:
        :class:`NoiseScale`.
    """
    if len(x) < 2:
        raise ValueError("the gradient noise scale needs at least two examples")
    g = per_sample_grads(model, loss_fn, x, y, chunk).double()
    mean = g.mean(0)
    trace_cov = float((g - mean).pow(2).sum() / (len(g) - 1))
    sq = float(mean.pow(2).sum())
    return NoiseScale(sq, trace_cov, trace_cov / sq if sq > 0 else float("inf"), len(g))
