"""Optimizers, schedules and one optimizer step, for forward-only (ZO) and backprop (FO) methods."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR

from hdopt.finetune.config import FO_OPTIMIZERS, RunConfig
from hdopt.zo import OPTIMIZERS as ZO_OPTIMIZERS
from hdopt.zo import Reduce


class DivergenceError(RuntimeError):
    """Training diverged (non-finite loss, or a loss far above the first one)."""


def build_optimizer(cfg: RunConfig, trainer: str, params: list[tuple[str, torch.nn.Parameter]],
                    reduce: Reduce | None = None):  # fmt: skip
    """The run's optimizer over the named trainable parameters (``reduce``: the data-parallel ZO hook)."""
    name, o = cfg.method.optimizer, cfg.optim
    if trainer == "zo":
        if name not in ZO_OPTIMIZERS:
            raise ValueError(f"ZO methods take a ZO optimizer ({', '.join(ZO_OPTIMIZERS)}), got {name!r}")
        cls = ZO_OPTIMIZERS.get(name)
        extra = {"momentum": o.momentum} if "momentum" in inspect.signature(cls).parameters else {}
        return cls(
            params, lr=o.lr, eps=o.eps, weight_decay=o.weight_decay, q=cfg.method.q,
            estimator=cfg.method.estimator, noise=cfg.method.noise, seed=cfg.train.seed, reduce=reduce,
            **extra,
        )  # fmt: skip
    if name not in FO_OPTIMIZERS:
        raise ValueError(f"backprop methods take {' or '.join(FO_OPTIMIZERS)}, got {name!r}")
    tensors = [p for _, p in params]
    if name == "sgd":
        return torch.optim.SGD(tensors, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(tensors, lr=o.lr, weight_decay=o.weight_decay)


def lr_multiplier(schedule: str, steps: int) -> Callable[[int], float]:
    """``constant`` -> 1; ``linear`` -> ``1 - t/steps`` (0 after the last step)."""
    if schedule == "constant":
        return lambda t: 1.0
    return lambda t: max(0.0, 1.0 - t / steps)


def build_scheduler(optimizer, schedule: str, steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lr_multiplier(schedule, steps))


def forwards_per_step(cfg: RunConfig, trainer: str, optimizer=None) -> tuple[int, int]:
    """``(forward passes, backward passes)`` over a micro-batch per optimizer step (ZO: the optimizer's
    count, e.g. 2q for the central estimator)."""
    accum = cfg.train.grad_accum
    if trainer == "fo":
        return accum, accum
    return optimizer.forwards_per_step(accum), 0


def zo_step(optimizer, closures: Sequence[Callable[[], torch.Tensor]]) -> float:
    """One ZO step: the projected gradients of every micro-batch, averaged, then one update (a rule that
    evaluates candidate updates does so on the last micro-batch)."""
    for closure in closures[:-1]:
        optimizer.estimate(closure)
    return float(optimizer.step(closures[-1]))


def fo_step(optimizer, closures: Sequence[Callable[[], torch.Tensor]]) -> float:
    """One backprop step with gradient accumulation; raises before updating when the loss is not finite."""
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for closure in closures:
        loss = closure()
        value = float(loss.detach())
        if not math.isfinite(value):
            optimizer.zero_grad(set_to_none=True)
            raise DivergenceError(f"the loss is {value}; the weights were not updated")
        (loss / len(closures)).backward()
        total += value
    optimizer.step()
    return total / len(closures)
