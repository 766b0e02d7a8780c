"""Optimizers from the edge-of-stability theory (Arora, Li & Panigrahi, ICML 2022).

* :class:`NormalizedGD`:  w <- w - eta * grad L(w) / ||grad L(w)||   (norm over the parameter group).
* :class:`SqrtLossGD`:    GD on sqrt(L):  w <- w - eta * grad L(w) / (2 sqrt(L(w))).

Both reach the manifold of minimizers and then drift along it, reducing sharpness over Theta(eta^-2) steps;
their step is stable only while sharpness * eta / ||grad L|| (resp. / (2 sqrt L)) stays near 2.
Both are stateless apart from a step counter (kept in ``state`` so ``state_dict`` round-trips).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


class NormalizedGD(torch.optim.Optimizer):
    """Normalized gradient descent: ``w <- w - lr * g / (||g|| + eps)``, ||g|| over all params of a group.

    Args:
        params: parameters or parameter groups.
        lr: eta (> 0).
        eps: guards the division at a stationary point.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float, eps: float = 1e-12):
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if eps < 0:
            raise ValueError(f"eps must be non-negative, got {eps}")
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One step from the gradients already in ``.grad``; ``closure`` (optional) recomputes them."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in params))
            scale = group["lr"] / (norm + group["eps"])
            for p in params:
                p.add_(p.grad, alpha=-float(scale))
                self.state[p]["step"] = self.state[p].get("step", 0) + 1
        return loss


class SqrtLossGD(torch.optim.Optimizer):
    """Gradient descent on sqrt(L): ``w <- w - lr * g / (2 sqrt(L) + eps)``.

    Args:
        params: parameters or parameter groups.
        lr: eta (> 0).
        eps: guards the division when L reaches 0.

    ``step(closure)`` requires a closure that zeroes the gradients, computes the loss L >= 0, calls
    ``backward()`` and returns L.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float, eps: float = 1e-12):
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if eps < 0:
            raise ValueError(f"eps must be non-negative, got {eps}")
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """One step; the closure's loss value sets the step size."""
        if closure is None:
            raise ValueError("SqrtLossGD.step needs a closure that computes the loss, calls backward() "
                             "and returns the loss (its value sets the step size)")
        with torch.enable_grad():
            loss = closure()
        value = float(loss)
        if value < 0:
            raise ValueError(f"GD on sqrt(L) needs a non-negative loss, got {value}")
        for group in self.param_groups:
            scale = group["lr"] / (2.0 * value ** 0.5 + group["eps"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.add_(p.grad, alpha=-scale)
                self.state[p]["step"] = self.state[p].get("step", 0) + 1
        return loss
