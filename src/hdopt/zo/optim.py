"""The classic zeroth-order update rules on the SPSA estimate ``ghat`` of :mod:`hdopt.zo.base`.

``ZOSGD`` (MeZO; optional momentum), ``ZOAdam``, ``ZOSign`` and ``ZOConservative`` (ZO-Bench's rules). Each
is a :class:`~hdopt.zo.base.ZOOptimizer` that supplies the per-chunk update; later optimizers (FZOO, HiZOO,
LOZO, Sparse-MeZO) live in modules of their own. The registry of names is :mod:`hdopt.zo.registry`.
"""

from __future__ import annotations

import math

import torch

from hdopt.zo.base import Closure, NonFiniteLossError, ZOOptimizer, check_nonnegative, state_dtype
from hdopt.zo.trajectory import UpdateRecord

__all__ = ["NonFiniteLossError", "ZOAdam", "ZOConservative", "ZOOptimizer", "ZOSGD", "ZOSign"]


class ZOSGD(ZOOptimizer):
    """MeZO: ``theta <- theta - lr * (ghat + wd * theta)``; with ``momentum`` mu, heavy-ball on ``ghat``.

    Without momentum there is no per-parameter buffer: peak memory is that of inference. Momentum keeps a
    float32 buffer the size of the parameters.

    Example::

        opt = ZOSGD(model.named_parameters(), lr=1e-6, eps=1e-3)
        loss = opt.step(lambda: model(**batch).loss)
    """

    def __init__(
        self,
        params,
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        momentum: float = 0.0,
        **kwargs,
    ):
        super().__init__(params, lr, eps, weight_decay, momentum=momentum, **kwargs)

    def add_param_group(self, param_group: dict) -> None:
        momentum = param_group.get("momentum", self.defaults["momentum"])  # the group's own, else the default
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        super().add_param_group(param_group)

    def init_state(self, p, state, group) -> None:
        if group["momentum"] and "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros(p.shape, dtype=state_dtype(p), device=p.device)

    def update_chunk(self, w32, slot, terms, start, length, directions, state, group, lr, wd) -> None:
        if not group["momentum"]:
            if wd:
                w32.mul_(1.0 - lr * wd)
            for key, coef in terms:  # no ghat temporary: add each direction's noise directly, piece by piece
                for at, z in directions.pieces(slot, key, start, length):
                    w32[at : at + z.numel()].add_(z, alpha=-lr * coef)
            return
        buf = state["momentum_buffer"].view(-1)[start : start + length]
        buf.mul_(group["momentum"]).add_(self.noise_sum(slot, terms, start, length, directions, w32))
        if wd:
            buf.add_(w32, alpha=wd)
        w32.add_(buf, alpha=-lr)


class ZOAdam(ZOOptimizer):
    """Adam on the ZO estimate ``ghat`` with decoupled weight decay (AdamW form).

    ``m <- b1 m + (1-b1) ghat``, ``v <- b2 v + (1-b2) ghat^2``,
    ``theta <- theta (1 - lr wd) - lr * mhat / (sqrt(vhat) + adam_eps)``. Keeps two float32 buffers.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        **kwargs,
    ):
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        check_nonnegative("adam_eps", adam_eps)
        super().__init__(params, lr, eps, weight_decay, betas=tuple(betas), adam_eps=adam_eps, **kwargs)

    def init_state(self, p, state, group) -> None:
        if "exp_avg" not in state:
            state["adam_step"] = 0
            state["exp_avg"] = torch.zeros(p.shape, dtype=state_dtype(p), device=p.device)
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=state_dtype(p), device=p.device)

    def update_param(self, p, slot, terms, group, lr, directions, record) -> None:
        state = self.state[p]
        self.init_state(p, state, group)
        state["adam_step"] += 1
        super().update_param(p, slot, terms, group, lr, directions, record)

    def update_chunk(self, w32, slot, terms, start, length, directions, state, group, lr, wd) -> None:
        beta1, beta2 = group["betas"]
        t = state["adam_step"]
        ghat = self.noise_sum(slot, terms, start, length, directions, w32)
        m = state["exp_avg"].view(-1)[start : start + length]
        v = state["exp_avg_sq"].view(-1)[start : start + length]
        m.mul_(beta1).add_(ghat, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(ghat, ghat, value=1 - beta2)
        denom = v.sqrt().div_(math.sqrt(1 - beta2**t)).add_(group["adam_eps"])
        if wd:
            w32.mul_(1.0 - lr * wd)
        w32.addcdiv_(m, denom, value=-lr / (1 - beta1**t))


class ZOSign(ZOOptimizer):
    """Sign descent on the ZO estimate: ``theta <- theta (1 - lr wd) - lr * sign(ghat)`` (ZO-SGD-sign)."""

    def __init__(self, params, lr: float = 1e-5, eps: float = 1e-3, weight_decay: float = 0.0, **kwargs):
        super().__init__(params, lr, eps, weight_decay, **kwargs)

    def update_chunk(self, w32, slot, terms, start, length, directions, state, group, lr, wd) -> None:
        ghat = self.noise_sum(slot, terms, start, length, directions, w32)
        if wd:
            w32.mul_(1.0 - lr * wd)
        w32.add_(ghat.sign_(), alpha=-lr)


class ZOConservative(ZOSGD):
    """ZO-SGD that evaluates candidate updates and keeps the best (ZO-SGD-conservative).

    Candidates: the SGD update ``-lr*ghat``, its reverse ``+lr*ghat`` and no update. Each is a forward pass
    at the candidate weights (computed on the fly like a perturbation, nothing is written), so a step costs
    three more forwards than ZOSGD. Needs the closure at :meth:`step` (with gradient accumulation: the last
    micro-batch's); data-parallel, the candidate losses are averaged over workers too.
    """

    def forwards_per_step(self, micro_batches: int = 1) -> int:
        return super().forwards_per_step(micro_batches) + 3

    def select(self, record: UpdateRecord, closure: Closure | None) -> UpdateRecord:
        if closure is None:
            raise RuntimeError("ZOConservative evaluates candidate updates: call step(closure)")
        if any(group["momentum"] for group in self.param_groups):
            raise ValueError("ZOConservative does not combine with momentum")
        directions = self.direction_keys(record.step_key)
        scales = (0.0, 1.0, -1.0)
        local = [self.evaluate(closure, [], "the current weights")]
        eps = record.eps
        for scale in scales[1:]:
            terms = [(d, -scale * g / self.q) for d, g in zip(directions, record.grads, strict=True)]
            factors = self._candidate_factors(record.lrs, eps)
            local.append(self.evaluate(closure, terms, f"candidate update x{scale:+.0f}", factors))
        losses = dict(zip(scales, self.reduce_values(local, "candidate_losses"), strict=True))
        best = min(losses, key=lambda s: (losses[s], -s))  # ties prefer the plain update
        return UpdateRecord(record.step, record.step_key, record.grads, record.lrs, best, record.eps,
                            record.extras)  # fmt: skip

    def _candidate_factors(self, lrs, eps) -> dict[int, tuple[float, float]]:
        """Group ``g`` sees ``(1 - lr_g wd_g) theta - lr_g (eps_1/eps_g) * sum_i c_i z_i``."""
        factors = {}
        for group, lr, e in zip(self.param_groups, lrs, eps, strict=True):
            for p in group["params"]:
                decays = p.ndim >= 2 or group["decay_1d"]
                wd = group["weight_decay"] if decays and lr else 0.0
                factors[id(p)] = (lr * (eps[0] / e), 1.0 - lr * wd)
        return factors
