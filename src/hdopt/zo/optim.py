"""Zeroth-order optimizers with the torch.optim contract: ``opt.step(closure)``, param groups, schedulers.

One step, for directions ``i = 1..q`` with noise ``z_i`` (see :mod:`hdopt.zo.noise`):

* estimate (SPSA): central ``g_i = (L(theta + eps z_i) - L(theta - eps z_i)) / (2 eps)`` or one-sided
  ``g_i = (L(theta + eps z_i) - L(theta)) / eps``; the gradient estimate is ``ghat = (1/q) sum_i g_i z_i``.
  The closure is evaluated at perturbed weights without writing them (:mod:`hdopt.zo.perturb`).
* update: a rule applied chunk by chunk, regenerating ``z_i`` from its seed (``ghat`` is never stored whole):
  ``ZOSGD`` (MeZO; optional momentum), ``ZOAdam``, ``ZOSign``, ``ZOConservative``.

Gradient accumulation: call :meth:`ZOOptimizer.estimate` once per micro-batch (the same directions are reused
within a step), then :meth:`ZOOptimizer.step` without a closure. Every update is logged as an
:class:`~hdopt.zo.trajectory.UpdateRecord` (a few bytes), from which :func:`hdopt.zo.trajectory.replay`
rebuilds the weights bitwise.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim import Optimizer

from hdopt.zo.noise import DEFAULT_CHUNK, DISTRIBUTIONS, NoiseGenerator, chunks, derive_key, name_id
from hdopt.zo.perturb import ParamSlot, Perturbation
from hdopt.zo.rounding import HALF_DTYPES, stochastic_round
from hdopt.zo.trajectory import Trajectory, UpdateRecord

ESTIMATORS = ("central", "one-sided")
PERTURB_MODES = ("auto", "forward", "inplace")
_ROUNDING_TAG = 0x5352  # separates the stochastic-rounding stream from the direction streams

Closure = Callable[[], torch.Tensor | float]


class NonFiniteLossError(FloatingPointError):
    """The closure returned NaN or inf; the weights are exactly as before the step."""


@dataclass
class _Pending:
    """Projected gradients summed over the micro-batches of the current step."""

    grads: list[float]
    loss: float
    count: int = 0


def _state_dtype(p: torch.Tensor) -> torch.dtype:
    """Optimizer buffers are float32 for half-precision parameters, else the parameter's dtype."""
    return torch.float32 if p.dtype in HALF_DTYPES else p.dtype


def _check_nonnegative(name: str, value: float) -> None:
    if not value >= 0.0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0, got {value}")


class ZOOptimizer(Optimizer):
    """Base class: SPSA estimation shared by all zeroth-order update rules.

    Args:
        params: tensors, ``named_parameters()`` (recommended: noise is then keyed by name, so it does not
            depend on parameter order) or param groups (dicts), as for any torch optimizer.
        lr: learning rate (per group; schedulers change it).
        eps: perturbation scale (> 0).
        weight_decay: L2 coefficient; skips 1-D tensors (biases, norm gains) unless the group sets
            ``decay_1d=True``.
        q: directions per step (n-SPSA); only q seeds and q scalars are kept.
        estimator: ``"central"`` (two-point, 2q forwards) or ``"one-sided"`` (q + 1 forwards).
        noise: ``"gaussian"`` (the paper's) or ``"rademacher"`` (cheaper to generate, same second moment).
        seed: the run's seed; step ``t`` uses key ``derive_key(seed, t)``.
        chunk: largest noise temporary, in elements.
        perturb: ``"forward"`` (perturbed copies at module-forward time), ``"inplace"`` (backup, perturb,
            restore: exact, costs a copy) or ``"auto"`` (forward; tensors that no module forward used are
            switched to inplace on the first step).
        stochastic_rounding: per group; ``None`` = on for bfloat16/float16 tensors.
        decay_1d: per group; apply weight decay to 1-D tensors too.
    """

    def __init__(
        self,
        params,
        lr: float,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        q: int = 1,
        estimator: str = "central",
        noise: str = "gaussian",
        seed: int = 0,
        chunk: int = DEFAULT_CHUNK,
        perturb: str = "auto",
        stochastic_rounding: bool | None = None,
        decay_1d: bool = False,
        **rule_defaults,
    ):
        _check_nonnegative("lr", lr)
        _check_nonnegative("weight_decay", weight_decay)
        if not eps > 0.0 or math.isinf(eps):
            raise ValueError(f"eps must be a finite number > 0, got {eps}")
        if not isinstance(q, int) or q < 1:
            raise ValueError(f"q (directions per step) must be an integer >= 1, got {q}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if noise not in DISTRIBUTIONS:
            raise ValueError(f"noise must be one of {DISTRIBUTIONS}, got {noise!r}")
        if perturb not in PERTURB_MODES:
            raise ValueError(f"perturb must be one of {PERTURB_MODES}, got {perturb!r}")
        if chunk < 64:
            raise ValueError(f"chunk must be >= 64 elements, got {chunk}")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            stochastic_rounding=stochastic_rounding,
            decay_1d=decay_1d,
            **rule_defaults,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_nonnegative("lr", group["lr"])
            _check_nonnegative("weight_decay", group["weight_decay"])
        self.eps, self.q, self.estimator, self.noise = float(eps), q, estimator, noise
        self.seed, self.chunk, self.perturb = int(seed), int(chunk), perturb
        self.trajectory = Trajectory()
        self._pending: _Pending | None = None
        self._generators: dict[torch.device, NoiseGenerator] = {}
        self.state["zo"] = {"step": 0, "inplace": []}

    # -- identities and noise ------------------------------------------------------------------------
    def _slots(self) -> dict[int, ParamSlot]:
        slots: dict[int, ParamSlot] = {}
        ordinal = 0
        for group in self.param_groups:
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                ident = name_id(names[i]) if names else name_id(f"#{ordinal}")
                slots[id(p)] = ParamSlot(p, ident)
                ordinal += 1
        return slots

    def _generator(self, device: torch.device) -> NoiseGenerator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = NoiseGenerator(self.noise, self.chunk, device)
        return gen

    def _single_generator(self) -> NoiseGenerator:
        devices = {p.device for g in self.param_groups for p in g["params"]}
        if len(devices) != 1:
            raise NotImplementedError(
                f"parameters live on several devices ({sorted(map(str, devices))}); hdopt.zo steps one "
                "device at a time: move the trainable parameters to one device"
            )
        return self._generator(devices.pop())

    @property
    def step_count(self) -> int:
        """Number of updates applied so far."""
        return self.state["zo"]["step"]

    def direction_keys(self, step_key: int) -> list[int]:
        return [derive_key(step_key, i) for i in range(self.q)]

    def _step_key(self) -> int:
        return derive_key(self.seed, self.step_count)

    # -- loss evaluation -----------------------------------------------------------------------------
    def _evaluate(self, closure: Closure, terms, what: str, factors=None) -> float:
        """Loss at the perturbation ``terms``, with the weights left exactly as they were."""
        slots = self._slots()
        inplace = self._inplace_ids(slots)
        gen = self._single_generator()
        with Perturbation(slots, terms, gen, inplace, factors) as pert:
            loss = closure()
        if pert.active and self.perturb == "auto" and not self.state["zo"].get("discovered"):
            unseen = [i for i in slots if i not in pert.seen]
            self.state["zo"]["discovered"] = True
            if unseen:
                self._switch_to_inplace(slots, unseen)
                return self._evaluate(closure, terms, what, factors)
        return self._check_loss(loss, what)

    def _inplace_ids(self, slots: dict[int, ParamSlot]) -> frozenset[int]:
        if self.perturb == "inplace":
            return frozenset(slots)
        wanted = set(self.state["zo"]["inplace"])
        return frozenset(i for i, s in slots.items() if s.ident in wanted)

    def _switch_to_inplace(self, slots: dict[int, ParamSlot], unseen: list[int]) -> None:
        self.state["zo"]["inplace"] = sorted({slots[i].ident for i in unseen})
        modules_params = [slots[i].tensor for i in unseen if isinstance(slots[i].tensor, nn.Parameter)]
        if modules_params:
            warnings.warn(
                f"{len(modules_params)} trainable nn.Parameter(s) were not used inside the forward of a "
                "module that owns them; they are perturbed in place with a backup copy (exact, but it "
                "costs their memory). If they are unused, leave them out of the optimizer.",
                stacklevel=4,
            )

    def _check_loss(self, loss, what: str) -> float:
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(
                    f"the closure must return a scalar loss, got a tensor of shape {tuple(loss.shape)}; "
                    "reduce it (e.g. .mean()) inside the closure"
                )
            value = float(loss.detach().item())
        elif isinstance(loss, (int, float)):
            value = float(loss)
        else:
            raise TypeError(f"the closure must return a scalar tensor or float, got {type(loss).__name__}")
        if not math.isfinite(value):
            self._pending = None
            raise NonFiniteLossError(
                f"the closure returned {value} at {what} (step {self.step_count}); "
                "the weights are unchanged. "
                "Lower eps or lr, or check the batch."
            )
        return value

    # -- estimation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def estimate(self, closure: Closure) -> float:
        """Add one micro-batch's projected gradients for the current step; returns its loss.

        The reported loss is ``L(theta + eps z_1)`` averaged over directions for the central estimator (as the
        reference logs it) and ``L(theta)`` for the one-sided one.
        """
        if closure is None:
            raise TypeError("estimate() needs a closure that returns the loss")
        keys = self.direction_keys(self._step_key())
        eps = self.eps
        grads, reported = [], []
        if self.estimator == "central":
            for i, key in enumerate(keys):
                plus = self._evaluate(closure, [(key, eps)], f"+eps direction {i}")
                minus = self._evaluate(closure, [(key, -eps)], f"-eps direction {i}")
                grads.append((plus - minus) / (2 * eps))
                reported.append(plus)
        else:
            base = self._evaluate(closure, [], "the unperturbed weights")
            for i, key in enumerate(keys):
                plus = self._evaluate(closure, [(key, eps)], f"+eps direction {i}")
                grads.append((plus - base) / eps)
            reported.append(base)
        loss = sum(reported) / len(reported)
        if self._pending is None:
            self._pending = _Pending([0.0] * self.q, 0.0)
        pending = self._pending
        pending.grads = [a + b for a, b in zip(pending.grads, grads, strict=True)]
        pending.loss += loss
        pending.count += 1
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Discard projected gradients accumulated by :meth:`estimate` (and any ``.grad``)."""
        self._pending = None
        super().zero_grad(set_to_none)

    def reduce_grads(self, grads: list[float]) -> list[float]:
        """Hook for data-parallel training: combine projected gradients across workers (identity here)."""
        return grads

    def reduce_losses(self, losses: list[float]) -> list[float]:
        """Hook for data-parallel training: combine candidate losses across workers (identity here)."""
        return losses

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> float:
        """One update. With a closure: estimate, then update. Without: update from :meth:`estimate` calls.

        Returns the loss reported by the estimate (averaged over micro-batches).
        """
        if closure is not None:
            self.estimate(closure)
        if self._pending is None:
            raise RuntimeError(
                "a zeroth-order step needs the loss: call step(closure) with a closure that returns it, "
                "or estimate(closure) once per micro-batch before step()"
            )
        pending, self._pending = self._pending, None
        grads = self.reduce_grads([g / pending.count for g in pending.grads])
        record = UpdateRecord(
            step=self.step_count,
            step_key=self._step_key(),
            grads=tuple(grads),
            lrs=tuple(float(g["lr"]) for g in self.param_groups),
        )
        record = self._select(record, closure)
        self.apply_update(record)
        return pending.loss / pending.count

    def _select(self, record: UpdateRecord, closure: Closure | None) -> UpdateRecord:
        """Hook for rules that choose among candidate updates (see :class:`ZOConservative`)."""
        return record

    # -- update --------------------------------------------------------------------------------------
    @torch.no_grad()
    def apply_update(self, record: UpdateRecord) -> None:
        """Apply a logged update (used by :meth:`step` and by replay) and advance the step counter."""
        if record.step != self.step_count:
            raise ValueError(f"update record for step {record.step} applied at step {self.step_count}")
        gen = self._single_generator()
        directions = self.direction_keys(record.step_key)
        coefs = [record.scale * g / self.q for g in record.grads]
        slots = self._slots()
        for group, lr in zip(self.param_groups, record.lrs, strict=True):
            if lr == 0.0:
                continue  # exact no-op: weights and state untouched
            for p in group["params"]:
                slot = slots[id(p)]
                terms = [(slot.key(d), c) for d, c in zip(directions, coefs, strict=True) if c != 0.0]
                self._update_param(p, slot, terms, group, lr, gen, record.step_key)
        self.state["zo"]["step"] += 1
        self.trajectory.append(record)

    def _update_param(self, p, slot, terms, group, lr, gen, step_key) -> None:
        if not p.is_contiguous():
            raise ValueError("hdopt.zo updates contiguous tensors only; call .contiguous() on the parameter")
        decays = p.ndim >= 2 or group["decay_1d"]
        wd = group["weight_decay"] if decays else 0.0
        half = p.dtype in HALF_DTYPES
        rounding = group["stochastic_rounding"]
        rounding = half if rounding is None else (rounding and half)
        state = self.state[p]
        self._init_state(p, state, group)
        flat = p.detach().view(-1)
        rounding_key = derive_key(step_key, _ROUNDING_TAG, slot.ident)
        for start, length in chunks(p.numel(), gen.chunk):
            piece = flat[start : start + length]
            w32 = piece.float() if half else piece  # half dtypes are updated in float32, then rounded
            self._update_chunk(w32, terms, start, length, gen, state, group, lr, wd)
            if w32 is piece:
                continue
            if rounding:
                piece.copy_(stochastic_round(w32, p.dtype, gen.words(rounding_key, start, length)))
            else:
                piece.copy_(w32)

    def _noise_sum(
        self, terms, start: int, length: int, gen: NoiseGenerator, like: torch.Tensor
    ) -> torch.Tensor:
        """``ghat`` on one chunk: ``sum_i c_i z_i`` (a fresh tensor of ``like``'s dtype and device)."""
        dtype, device = like.dtype, like.device
        ghat = torch.zeros(length, dtype=dtype, device=device)
        for key, coef in terms:
            ghat.add_(gen.generate(key, start, length), alpha=coef)
        return ghat

    def _init_state(self, p, state, group) -> None:
        """Create per-parameter buffers (none for plain ZO-SGD)."""

    def _update_chunk(self, w32, terms, start, length, gen, state, group, lr, wd) -> None:
        raise NotImplementedError

    # -- trajectory ----------------------------------------------------------------------------------
    def trajectory_header(self) -> dict:
        """What replay needs besides the records: the rule, its settings and the parameter identities."""
        groups = []
        for group in self.param_groups:
            settings = {k: v for k, v in group.items() if k not in ("params", "param_names", "lr")}
            groups.append(
                {"settings": settings, "names": group.get("param_names"), "size": len(group["params"])}
            )
        return {
            "optimizer": type(self).__name__,
            "config": {
                "eps": self.eps,
                "q": self.q,
                "estimator": self.estimator,
                "noise": self.noise,
                "seed": self.seed,
                "chunk": self.chunk,
                "perturb": self.perturb,
            },
            "groups": groups,
        }

    def save_trajectory(self, path) -> None:
        """Write the trajectory log (header + one record per step) atomically."""
        self.trajectory.save(path, self.trajectory_header())


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
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        super().__init__(params, lr, eps, weight_decay, momentum=momentum, **kwargs)

    def _init_state(self, p, state, group) -> None:
        if group["momentum"] and "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros(p.shape, dtype=_state_dtype(p), device=p.device)

    def _update_chunk(self, w32, terms, start, length, gen, state, group, lr, wd) -> None:
        if not group["momentum"]:
            if wd:
                w32.mul_(1.0 - lr * wd)
            for key, coef in terms:  # no ghat temporary: add each direction's noise directly, piece by piece
                for at, z in gen.pieces(key, start, length):
                    w32[at : at + z.numel()].add_(z, alpha=-lr * coef)
            return
        buf = state["momentum_buffer"].view(-1)[start : start + length]
        buf.mul_(group["momentum"]).add_(self._noise_sum(terms, start, length, gen, w32))
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
        _check_nonnegative("adam_eps", adam_eps)
        super().__init__(params, lr, eps, weight_decay, betas=tuple(betas), adam_eps=adam_eps, **kwargs)

    def _init_state(self, p, state, group) -> None:
        if "exp_avg" not in state:
            state["adam_step"] = 0
            state["exp_avg"] = torch.zeros(p.shape, dtype=_state_dtype(p), device=p.device)
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=_state_dtype(p), device=p.device)

    def _update_param(self, p, slot, terms, group, lr, gen, step_key) -> None:
        state = self.state[p]
        self._init_state(p, state, group)
        state["adam_step"] += 1
        super()._update_param(p, slot, terms, group, lr, gen, step_key)

    def _update_chunk(self, w32, terms, start, length, gen, state, group, lr, wd) -> None:
        beta1, beta2 = group["betas"]
        t = state["adam_step"]
        ghat = self._noise_sum(terms, start, length, gen, w32)
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

    def _update_chunk(self, w32, terms, start, length, gen, state, group, lr, wd) -> None:
        ghat = self._noise_sum(terms, start, length, gen, w32)
        if wd:
            w32.mul_(1.0 - lr * wd)
        w32.add_(ghat.sign_(), alpha=-lr)


class ZOConservative(ZOSGD):
    """ZO-SGD that evaluates candidate updates and keeps the best (ZO-SGD-conservative).

    Candidates: the SGD update ``-lr*ghat``, its reverse ``+lr*ghat`` and no update. Each is a forward pass
    at the candidate weights (computed on the fly like a perturbation, nothing is written), so a step costs
    three more forwards than ZOSGD. Needs ``step(closure)``.
    """

    def _select(self, record: UpdateRecord, closure: Closure | None) -> UpdateRecord:
        if closure is None:
            raise RuntimeError("ZOConservative evaluates candidate updates: call step(closure)")
        if any(group["momentum"] for group in self.param_groups):
            raise ValueError("ZOConservative does not combine with momentum")
        directions = self.direction_keys(record.step_key)
        slots = self._slots()
        scales = (0.0, 1.0, -1.0)
        local = [self._evaluate(closure, [], "the current weights")]
        for scale in scales[1:]:
            terms = [(d, -scale * g / self.q) for d, g in zip(directions, record.grads, strict=True)]
            factors = self._candidate_factors(slots, record.lrs)
            local.append(self._evaluate(closure, terms, f"candidate update x{scale:+.0f}", factors))
        losses = dict(zip(scales, self.reduce_losses(local), strict=True))  # data-parallel: the batch mean
        best = min(losses, key=lambda s: (losses[s], -s))  # ties prefer the plain update
        return UpdateRecord(record.step, record.step_key, record.grads, record.lrs, scale=best)

    def _candidate_factors(self, slots, lrs) -> dict[int, tuple[float, float]]:
        factors = {}
        for group, lr in zip(self.param_groups, lrs, strict=True):
            for p in group["params"]:
                decays = p.ndim >= 2 or group["decay_1d"]
                wd = group["weight_decay"] if decays and lr else 0.0
                factors[id(p)] = (lr, 1.0 - lr * wd)
        return factors


OPTIMIZERS: dict[str, type[ZOOptimizer]] = {
    cls.__name__: cls for cls in (ZOSGD, ZOAdam, ZOSign, ZOConservative)
}
