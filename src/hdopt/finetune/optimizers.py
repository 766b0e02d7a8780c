"""Optimizers, schedules and one optimizer step, for forward-only (ZO) and backprop (FO) methods."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR

from hdopt.finetune.config import RunConfig
from hdopt.zo import ZOSGD, ZOAdam, ZOConservative, ZOSign

ZO_OPTIMIZERS = {"zosgd": ZOSGD, "zoadam": ZOAdam, "zosign": ZOSign, "zoconservative": ZOConservative}
FO_OPTIMIZERS = ("adamw", "sgd")


class DivergenceError(RuntimeError):
    """Training diverged (non-finite loss, or a loss far above the first one)."""


def build_optimizer(cfg: RunConfig, trainer: str, params: list[tuple[str, torch.nn.Parameter]]):
    """The run's optimizer over the named trainable parameters."""
    name, o = cfg.method.optimizer, cfg.optim
    if trainer == "zo":
        if name not in ZO_OPTIMIZERS:
            raise ValueError(f"ZO methods take a ZO optimizer ({', '.join(ZO_OPTIMIZERS)}), got {name!r}")
        extra = {"momentum": o.momentum} if name in ("zosgd", "zoconservative") else {}
        return ZO_OPTIMIZERS[name](
            params, lr=o.lr, eps=o.eps, weight_decay=o.weight_decay, q=cfg.method.q,
            estimator=cfg.method.estimator, noise=cfg.method.noise, seed=cfg.train.seed, **extra,
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


def forwards_per_step(cfg: RunConfig, trainer: str) -> tuple[int, int]:
    """``(forward passes, backward passes)`` over the training batch per optimizer step."""
    accum = cfg.train.grad_accum
    if trainer == "fo":
        return accum, accum
    q = cfg.method.q
    per_micro = 2 * q if cfg.method.estimator == "central" else q + 1
    extra = 3 if cfg.method.optimizer == "zoconservative" else 0
    return per_micro * accum + extra, 0


def zo_step(optimizer, closures: Sequence[Callable[[], torch.Tensor]]) -> float:
    """One ZO step: the projected gradients of every micro-batch, averaged, then one update."""
    if len(closures) == 1:
        return float(optimizer.step(closures[0]))
    for closure in closures[:-1]:
        optimizer.estimate(closure)
    if isinstance(optimizer, ZOConservative):  # evaluates its candidates on the last micro-batch
        return float(optimizer.step(closures[-1]))
    optimizer.estimate(closures[-1])
    return float(optimizer.step())


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
