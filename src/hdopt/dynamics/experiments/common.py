"""Small helpers shared by the experiment recipes (loss evaluation, curve thinning, verdict titles)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def full_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
              loss_fn=nn.functional.cross_entropy) -> float:
    """Loss of ``model`` on all of ``(x, y)`` in one batch."""
    return float(loss_fn(model(x), y))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of examples whose arg-max logit is the label."""
    return float((model(x).argmax(1) == y).double().mean())


def thin(values: Sequence[float], points: int = 300) -> list[float]:
    """At most ``points`` evenly spaced entries of ``values`` (for results.json and plots)."""
    values = list(values)
    if len(values) <= points:
        return [float(v) for v in values]
    idx = np.linspace(0, len(values) - 1, points).round().astype(int)
    return [float(values[i]) for i in idx]


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average (the first entries average what is available)."""
    v = np.asarray(values, dtype=np.float64)
    window = max(1, min(window, len(v)))
    c = np.cumsum(np.insert(v, 0, 0.0))
    out = np.empty_like(v)
    out[window - 1:] = (c[window:] - c[:-window]) / window
    out[:window - 1] = c[1:window] / np.arange(1, window)
    return out


def verdict_title(fig, verdict: str, width: int = 190) -> None:
    """Put the whole verdict line above a figure, wrapped to ``width`` characters."""
    import textwrap

    fig.suptitle("\n".join(textwrap.wrap(verdict, width)), fontsize=8)
    fig.subplots_adjust(top=0.8)
