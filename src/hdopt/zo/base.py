"""The zeroth-order optimizer contract (torch.optim's, in full) and the SPSA estimate every rule shares.

One step, for directions ``i = 1..q`` (:mod:`hdopt.zo.directions`; MeZO's are i.i.d. noise) and groups
``g`` with perturbation scales ``eps_g``:

* estimate (SPSA): central ``g_i = (L(theta + eps z_i) - L(theta - eps z_i)) / (2 eps_1)`` or one-sided
  ``g_i = (L(theta + eps z_i) - L(theta)) / eps_1`` (``eps z`` is ``eps_g z_g`` on group ``g``), and
  ``ghat_g = (1/q) sum_i g_i (eps_1/eps_g) z_{i,g}``: with one eps for every group, MeZO's
  ``(1/q) sum_i g_i z_i``. The closure is evaluated at perturbed weights without writing them
  (:mod:`hdopt.zo.perturb`).
* reduce: the q projected gradients go through the ``reduce`` hook given at construction (data-parallel
  training averages them over workers: :class:`hdopt.distributed.ScalarAllReduce`).
* update: a rule applied chunk by chunk, regenerating ``z_i`` from its key (``ghat`` is never stored whole).

The contract, as torch.optim's: every hyperparameter (``lr``, ``eps``, ``weight_decay``, ``q``,
``estimator``, ``noise``, ``seed``, ``chunk``, ``perturb``, the rule's own) lives in ``param_groups`` and is
saved by :meth:`state_dict`. ``q``, ``estimator``, ``noise``, ``seed`` and ``chunk`` are shared by all groups
(one set of loss evaluations per step); the others are honoured per group. ``state_dict`` also holds the
step count and the trajectory, so :func:`hdopt.zo.replay` works after a resume in any loop;
:meth:`load_state_dict` refuses a state saved with another seed, noise, q, estimator or rule.

Gradient accumulation: call :meth:`ZOOptimizer.estimate` once per micro-batch (the same directions are reused
within a step), then :meth:`ZOOptimizer.step` (with the last micro-batch's closure, or none).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.optim import Optimizer

from hdopt.zo.directions import Directions
from hdopt.zo.noise import DEFAULT_CHUNK, DISTRIBUTIONS, NoiseGenerator, chunks, derive_key, name_id
from hdopt.zo.perturb import ParamSlot, Perturbation
from hdopt.zo.rounding import HALF_DTYPES, stochastic_round
from hdopt.zo.trajectory import Trajectory, UpdateRecord

ESTIMATORS = ("central", "one-sided")
PERTURB_MODES = ("auto", "forward", "inplace")
SHARED = ("q", "estimator", "noise", "seed", "chunk")  # one set of loss evaluations a step: all groups
IDENTITY = ("seed", "noise", "q", "estimator")  # a state saved with other values belongs to another run
_ROUNDING_TAG = 0x5352  # separates the stochastic-rounding stream from the direction streams

Closure = Callable[[], torch.Tensor | float]
Reduce = Callable[[list[float], str], Sequence[float]]
"""``reduce(values, kind) -> values``: combine a step's scalars across workers (e.g. their mean). ``kind``
names them (``"projected_gradients"``, ``"candidate_losses"``, or a rule's own). Every worker must call it
the same number of times, so with a reduce hook a non-finite local loss is carried as NaN into the
reduction and raised after it, on every worker alike."""


class NonFiniteLossError(FloatingPointError):
    """The closure returned NaN or inf; the weights are exactly as before the step."""


@dataclass
class Pending:
    """What the micro-batches of the current step have measured (sums over micro-batches)."""

    grads: list[float]
    losses: list[float]  # every evaluation of the step, in order (a rule may use them, e.g. their spread)
    loss: float = 0.0  # the reported loss
    count: int = 0
    extras: list[float] = field(default_factory=list)  # a rule's own per-step sums


def state_dtype(p: torch.Tensor) -> torch.dtype:
    """Optimizer buffers are float32 for half-precision parameters, else the parameter's dtype."""
    return torch.float32 if p.dtype in HALF_DTYPES else p.dtype


def check_nonnegative(name: str, value: Any) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < math.inf):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_group(group: dict) -> None:
    """Validate one param group's hyperparameters (raises ValueError naming the field)."""
    check_nonnegative("lr", group["lr"])
    check_nonnegative("weight_decay", group["weight_decay"])
    eps = group["eps"]
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0.0 < eps < math.inf):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    q = group["q"]
    if not isinstance(q, int) or isinstance(q, bool) or q < 1:
        raise ValueError(f"q (directions per step) must be an integer >= 1, got {q!r}")
    if group["estimator"] not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {group['estimator']!r}")
    if group["noise"] not in DISTRIBUTIONS:
        raise ValueError(f"noise must be one of {DISTRIBUTIONS}, got {group['noise']!r}")
    if group["perturb"] not in PERTURB_MODES:
        raise ValueError(f"perturb must be one of {PERTURB_MODES}, got {group['perturb']!r}")
    if not isinstance(group["chunk"], int) or group["chunk"] < 64:
        raise ValueError(f"chunk must be an integer >= 64 elements, got {group['chunk']!r}")
    if not isinstance(group["seed"], int) or isinstance(group["seed"], bool):
        raise ValueError(f"seed must be an integer, got {group['seed']!r}")


class ZOOptimizer(Optimizer):
    """Base class: the SPSA estimate, the contract and the trajectory, shared by all zeroth-order rules.

    Args:
        params: tensors, ``named_parameters()`` (recommended: noise is then keyed by name, so it does not
            depend on parameter order) or param groups (dicts), as for any torch optimizer.
        lr: learning rate (per group; schedulers change it).
        eps: perturbation scale (> 0; per group).
        weight_decay: L2 coefficient (per group); skips 1-D tensors (biases, norm gains) unless the group
            sets ``decay_1d=True``.
        q: directions per step (n-SPSA); only q seeds and q scalars are kept.
        estimator: ``"central"`` (two-point, 2q forwards) or ``"one-sided"`` (q + 1 forwards).
        noise: ``"gaussian"`` (the paper's) or ``"rademacher"`` (cheaper to generate, same second moment).
        seed: the run's seed; step ``t`` uses key ``derive_key(seed, t)``.
        chunk: largest noise temporary, in elements.
        perturb: per group: ``"forward"`` (perturbed copies at module-forward time), ``"inplace"`` (backup,
            perturb, restore: exact, costs a copy) or ``"auto"`` (forward; tensors that no module forward
            used are switched to inplace on the first step).
        stochastic_rounding: per group; ``None`` = on for bfloat16/float16 tensors.
        decay_1d: per group; apply weight decay to 1-D tensors too.
        reduce: combines each step's scalars across workers (see :data:`Reduce`); ``None`` = one worker.
    """

    data_parallel = True  # False in a rule whose state depends on more than the reduced scalars
    record_extras = 0  # rule-specific scalars logged per step (see UpdateRecord.extras)
    # The paper's hyperparameters (constructor keywords: lr, eps, q, noise, estimator, the rule's own), which
    # the fine-tuning layer uses for the fields a run leaves unset; empty: the method's defaults apply.
    paper_defaults: ClassVar[dict[str, Any]] = {}

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
        reduce: Reduce | None = None,
        **rule_defaults,
    ):
        defaults = dict(
            lr=lr, eps=eps, weight_decay=weight_decay, q=q, estimator=estimator, noise=noise, seed=seed,
            chunk=chunk, perturb=perturb, stochastic_rounding=stochastic_rounding, decay_1d=decay_1d,
            **rule_defaults,
        )  # fmt: skip
        check_group(defaults)
        if reduce is not None and not self.data_parallel:
            raise NotImplementedError(f"{type(self).__name__} cannot run data-parallel: {self.__doc__}")
        super().__init__(params, defaults)
        self.reduce = reduce
        self.trajectory = Trajectory()
        self._pending: Pending | None = None
        self._failure: str | None = None  # a deferred non-finite loss (with a reduce hook)
        self._directions: dict[torch.device, Directions] = {}
        self.state["zo"] = {"step": 0, "inplace": [], "discovered": False}

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_group(group)
        first = self.param_groups[0]
        for name in SHARED:
            if group[name] != first[name]:
                raise ValueError(
                    f"{name} is shared by all param groups (one set of loss evaluations per step): group "
                    f"{len(self.param_groups) - 1} sets {group[name]!r}, group 0 has {first[name]!r}"
                )

    # -- the shared hyperparameters ------------------------------------------------------------------
    @property
    def q(self) -> int:
        return self.param_groups[0]["q"]

    @property
    def estimator(self) -> str:
        return self.param_groups[0]["estimator"]

    @property
    def noise(self) -> str:
        return self.param_groups[0]["noise"]

    @property
    def seed(self) -> int:
        return self.param_groups[0]["seed"]

    @property
    def chunk(self) -> int:
        return self.param_groups[0]["chunk"]

    @property
    def step_count(self) -> int:
        """Number of updates applied so far."""
        return self.state["zo"]["step"]

    def forwards_per_step(self, micro_batches: int = 1) -> int:
        """Forward passes over a micro-batch that one step costs (``estimate`` per micro-batch + update)."""
        per_micro = 2 * self.q if self.estimator == "central" else self.q + 1
        return per_micro * micro_batches

    # -- identities and directions -------------------------------------------------------------------
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

    def make_directions(self, generator: NoiseGenerator) -> Directions:
        """The rule's direction source (MeZO: i.i.d. noise). Rules that shape directions override this."""
        return Directions(generator)

    def directions(self) -> Directions:
        """The direction source for the parameters' device."""
        devices = {p.device for g in self.param_groups for p in g["params"]}
        if len(devices) != 1:
            raise NotImplementedError(
                f"parameters live on several devices ({sorted(map(str, devices))}); hdopt.zo steps one "
                "device at a time: move the trainable parameters to one device"
            )
        device = devices.pop()
        source = self._directions.get(device)
        if source is None:
            source = self._directions[device] = self.make_directions(
                NoiseGenerator(self.noise, self.chunk, device)
            )
        return source

    def direction_keys(self, step_key: int) -> list[int]:
        return [derive_key(step_key, i) for i in range(self.q)]

    def step_key(self, step: int | None = None) -> int:
        """The key of step ``step`` (default: the next one)."""
        return derive_key(self.seed, self.step_count if step is None else step)

    # -- loss evaluation -----------------------------------------------------------------------------
    def evaluate(self, closure: Closure, terms, what: str, factors=None) -> float:
        """Loss at the perturbation ``terms`` (see :class:`~hdopt.zo.perturb.Perturbation`), with the weights
        left exactly as they were."""
        slots = self._slots()
        inplace = self._inplace_ids(slots)
        with Perturbation(slots, terms, self.directions(), inplace, factors) as pert:
            loss = closure()
        if pert.active and not self.state["zo"]["discovered"]:
            auto = {id(p) for g in self.param_groups if g["perturb"] == "auto" for p in g["params"]}
            unseen = [i for i in slots if i in auto and i not in pert.seen and i not in inplace]
            self.state["zo"]["discovered"] = True
            if unseen:
                self._switch_to_inplace(slots, unseen)
                return self.evaluate(closure, terms, what, factors)
        return self._check_loss(loss, what)

    def _inplace_ids(self, slots: dict[int, ParamSlot]) -> frozenset[int]:
        wanted = set(self.state["zo"]["inplace"])
        return frozenset(
            id(p)
            for group in self.param_groups
            for p in group["params"]
            if group["perturb"] == "inplace" or (group["perturb"] == "auto" and slots[id(p)].ident in wanted)
        )

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
            message = (
                f"the closure returned {value} at {what} (step {self.step_count}); "
                "the weights are unchanged. Lower eps or lr, or check the batch."
            )
            if self.reduce is None:
                self._pending, self._failure = None, None
                raise NonFiniteLossError(message)
            self._failure = self._failure or message  # raised after the reduction, on every worker
            return math.nan
        return value

    def eps_factors(self, sign: float) -> dict[int, tuple[float, float]]:
        """Per-tensor ``(scale, shrink)``: group ``g`` moves by ``sign * eps_g`` (terms of coefficient 1)."""
        return {id(p): (sign * g["eps"], 1.0) for g in self.param_groups for p in g["params"]}

    # -- estimation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def estimate(self, closure: Closure) -> float:
        """Add one micro-batch's projected gradients for the current step; returns its loss.

        The reported loss is ``L(theta + eps z_1)`` averaged over directions for the central estimator (as the
        reference logs it) and ``L(theta)`` for the one-sided one.
        """
        if closure is None:
            raise TypeError("estimate() needs a closure that returns the loss")
        keys = self.direction_keys(self.step_key())
        eps = self.param_groups[0]["eps"]
        grads, losses, reported = [], [], []
        plus_factors = self.eps_factors(1.0)
        if self.estimator == "central":
            minus_factors = self.eps_factors(-1.0)
            for i, key in enumerate(keys):
                plus = self.evaluate(closure, [(key, 1.0)], f"+eps direction {i}", plus_factors)
                minus = self.evaluate(closure, [(key, 1.0)], f"-eps direction {i}", minus_factors)
                grads.append((plus - minus) / (2 * eps))
                losses += [plus, minus]
                reported.append(plus)
        else:
            base = self.evaluate(closure, [], "the unperturbed weights")
            losses.append(base)
            for i, key in enumerate(keys):
                plus = self.evaluate(closure, [(key, 1.0)], f"+eps direction {i}", plus_factors)
                grads.append((plus - base) / eps)
                losses.append(plus)
            reported.append(base)
        loss = sum(reported) / len(reported)
        self._accumulate(grads, losses, loss)
        return loss

    def _accumulate(self, grads: list[float], losses: list[float], loss: float, extras=()) -> None:
        """Add one micro-batch's measurements to the step's sums."""
        pending = self._pending
        if pending is None:
            zeros = [0.0] * len(extras)
            pending = self._pending = Pending([0.0] * len(grads), [0.0] * len(losses), 0.0, 0, zeros)
        pending.grads = [a + b for a, b in zip(pending.grads, grads, strict=True)]
        pending.losses = [a + b for a, b in zip(pending.losses, losses, strict=True)]
        pending.extras = [a + b for a, b in zip(pending.extras, extras, strict=True)]
        pending.loss += loss
        pending.count += 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Discard projected gradients accumulated by :meth:`estimate` (and any ``.grad``)."""
        self._pending, self._failure = None, None
        super().zero_grad(set_to_none)

    def reduce_values(self, values: list[float], kind: str) -> list[float]:
        """``values`` combined across workers by the ``reduce`` hook (as they are with one worker); raises
        :class:`NonFiniteLossError` when any result is not finite (a worker's loss was not)."""
        out = list(values) if self.reduce is None else [float(v) for v in self.reduce(list(values), kind)]
        if len(out) != len(values):
            raise ValueError(f"the reduce hook returned {len(out)} values for {len(values)} {kind}")
        if not all(math.isfinite(v) for v in out):
            failure, self._failure, self._pending = self._failure, None, None
            raise NonFiniteLossError(
                failure
                or f"the {kind.replace('_', ' ')} combined over the workers are not finite at step "
                f"{self.step_count}: another worker's loss was not finite (its own message names the pass); "
                "the weights are unchanged"
            )
        return out

    def projected_gradients(self, pending: Pending) -> list[float]:
        """The step's projected gradients from the micro-batch sums, combined across workers."""
        return self.reduce_values([g / pending.count for g in pending.grads], "projected_gradients")

    def reduced_losses(self, pending: Pending) -> list[float]:
        """Every evaluation's loss of the step (in :meth:`estimate`'s order), averaged over micro-batches and
        combined across workers: for a rule whose step needs the losses themselves (their spread, a second
        difference), which overrides :meth:`projected_gradients` to reduce these instead."""
        return self.reduce_values([v / pending.count for v in pending.losses], "losses")

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> float:
        """One update. With a closure: estimate on it, then update. Without: update from :meth:`estimate`
        calls. Returns the loss reported by the estimate (averaged over micro-batches)."""
        if closure is not None:
            self.estimate(closure)
        if self._pending is None:
            raise RuntimeError(
                "a zeroth-order step needs the loss: call step(closure) with a closure that returns it, "
                "or estimate(closure) once per micro-batch before step()"
            )
        pending = self._pending
        grads = self.projected_gradients(pending)
        self._pending = None
        record = UpdateRecord(
            step=self.step_count,
            step_key=self.step_key(),
            grads=tuple(grads),
            lrs=tuple(float(g["lr"]) for g in self.param_groups),
            eps=tuple(float(g["eps"]) for g in self.param_groups),
            extras=tuple(self.record_extras_of(pending)),
        )
        record = self.select(record, closure)
        self._failure = None
        self.apply_update(record)
        return pending.loss / pending.count

    def record_extras_of(self, pending: Pending) -> list[float]:
        """A rule's per-step scalars for the record (``record_extras`` of them); none by default."""
        return []

    def select(self, record: UpdateRecord, closure: Closure | None) -> UpdateRecord:
        """Hook for rules that choose among candidate updates (see :class:`ZOConservative`)."""
        return record

    # -- update --------------------------------------------------------------------------------------
    @torch.no_grad()
    def apply_update(self, record: UpdateRecord) -> None:
        """Apply a logged update (used by :meth:`step` and by replay) and advance the step counter."""
        if record.step != self.step_count:
            raise ValueError(f"update record for step {record.step} applied at step {self.step_count}")
        directions = self.directions()
        keys = self.direction_keys(record.step_key)
        slots = self._slots()
        self.before_update(record)
        for group, lr, coefs in zip(self.param_groups, record.lrs, record.group_coefficients(self.q),
                                    strict=True):  # fmt: skip
            if lr == 0.0:
                continue  # exact no-op: weights and state untouched
            for p in group["params"]:
                slot = slots[id(p)]
                terms = [(slot.key(d), c) for d, c in zip(keys, coefs, strict=True) if c != 0.0]
                self.update_param(p, slot, terms, group, lr, directions, record)
        self.state["zo"]["step"] += 1
        self.trajectory.append(record)

    def before_update(self, record: UpdateRecord) -> None:
        """Hook run once per update before any parameter changes (a rule's per-step state)."""

    def update_param(self, p, slot: ParamSlot, terms, group: dict, lr: float, directions: Directions,
                     record: UpdateRecord) -> None:  # fmt: skip
        """Update one tensor chunk by chunk; half-precision tensors are updated in float32 and rounded."""
        if not p.is_contiguous():
            raise ValueError("hdopt.zo updates contiguous tensors only; call .contiguous() on the parameter")
        decays = p.ndim >= 2 or group["decay_1d"]
        wd = group["weight_decay"] if decays else 0.0
        half = p.dtype in HALF_DTYPES
        rounding = group["stochastic_rounding"]
        rounding = half if rounding is None else (rounding and half)
        state = self.state[p]
        self.init_state(p, state, group)
        flat = p.detach().view(-1)
        rounding_key = derive_key(record.step_key, _ROUNDING_TAG, slot.ident)
        for start, length in chunks(p.numel(), directions.chunk):
            piece = flat[start : start + length]
            w32 = piece.float() if half else piece
            self.update_chunk(w32, slot, terms, start, length, directions, state, group, lr, wd)
            if w32 is piece:
                continue
            if rounding:
                words = directions.generator.words(rounding_key, start, length)
                piece.copy_(stochastic_round(w32, p.dtype, words))
            else:
                piece.copy_(w32)

    def noise_sum(self, slot: ParamSlot, terms, start: int, length: int, directions: Directions,
                  like: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """``ghat`` on one chunk: ``sum_i c_i z_i`` (a fresh tensor of ``like``'s dtype and device)."""
        ghat = torch.zeros(length, dtype=like.dtype, device=like.device)
        for key, coef in terms:
            ghat.add_(directions.generate(slot, key, start, length), alpha=coef)
        return ghat

    def init_state(self, p, state: dict, group: dict) -> None:
        """Create per-parameter buffers (none for plain ZO-SGD)."""

    def update_chunk(self, w32, slot, terms, start, length, directions, state, group, lr, wd) -> None:
        raise NotImplementedError

    # -- trajectory and state ------------------------------------------------------------------------
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
            "config": {name: self.param_groups[0][name] for name in SHARED},
            "groups": groups,
            "record_extras": self.record_extras,
        }

    def save_trajectory(self, path) -> None:
        """Write the trajectory log (header + one record per step) atomically."""
        self.trajectory.save(path, self.trajectory_header())

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, whose ``state["zo"]`` also holds the rule's name and the trajectory (the
        records as uint8 bytes), so the dict loads with ``torch.load(weights_only=True)``."""
        sd = super().state_dict()
        zo = dict(sd["state"]["zo"])
        layout = [self.q, len(self.param_groups), self.record_extras]
        body = self.trajectory.pack(*layout)
        zo["optimizer"] = type(self).__name__
        empty = torch.empty(0, dtype=torch.uint8)
        zo["trajectory"] = torch.frombuffer(bytearray(body), dtype=torch.uint8) if body else empty
        zo["trajectory_layout"] = layout
        sd["state"] = {**sd["state"], "zo": zo}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict`; refuses one from another rule or another run."""
        zo = state_dict.get("state", {}).get("zo")
        if not isinstance(zo, dict) or "trajectory" not in zo:
            raise ValueError(
                "this is not the state of an hdopt.zo optimizer of this version (no 'zo' entry with the "
                "trajectory): save it with ZOOptimizer.state_dict()"
            )
        if zo.get("optimizer") != type(self).__name__:
            raise ValueError(
                f"cannot load the state of a {zo.get('optimizer')} into a {type(self).__name__}: build the "
                "optimizer that saved it"
            )
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"the state has {len(saved_groups)} param groups and this optimizer {len(self.param_groups)}"
            )
        for name in IDENTITY:
            saved, mine = saved_groups[0].get(name), self.param_groups[0][name]
            if saved != mine:
                raise ValueError(
                    f"cannot load this state: it was saved with {name}={saved!r} and this optimizer has "
                    f"{name}={mine!r}, so the run's directions would change. Build the optimizer with "
                    f"{name}={saved!r} to continue that run"
                )
        zo = dict(zo)
        body, layout = zo.pop("trajectory"), zo.pop("trajectory_layout")
        zo.pop("optimizer")
        super().load_state_dict({**state_dict, "state": {**state_dict["state"], "zo": zo}})
        self._restore_state_dtypes(state_dict)
        for group in self.param_groups:
            check_group(group)
        raw = body.to("cpu", torch.uint8).numpy().tobytes()  # accelerate may have moved it to the GPU
        trajectory = Trajectory.unpack(raw, *layout, where="the state dict")
        if len(trajectory) != self.step_count or any(r.step != t for t, r in enumerate(trajectory)):
            raise ValueError(
                f"the state's trajectory holds {len(trajectory)} records for {self.step_count} steps: it is "
                "damaged"
            )
        self.trajectory = trajectory
        self._directions.clear()
        self._pending, self._failure = None, None

    def _restore_state_dtypes(self, state_dict: dict[str, Any]) -> None:
        """torch casts every floating state tensor to its parameter's dtype on load; buffers of half-precision
        parameters are float32 here (:func:`state_dtype`), so they are taken again from the saved values."""
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params, strict=True):
            for name, value in state_dict["state"].get(saved_id, {}).items():
                loaded = self.state[p].get(name)
                if (
                    isinstance(value, torch.Tensor)
                    and value.is_floating_point()
                    and loaded.dtype != value.dtype
                ):
                    self.state[p][name] = value.to(dtype=state_dtype(p), device=p.device)
