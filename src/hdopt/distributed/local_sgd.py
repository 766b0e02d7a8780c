"""Local SGD around any torch optimizer: H local steps per worker, then average (post-local, QSR, DiLoCo).

With K workers, inner optimizer ``opt`` and a round of H steps starting from the shared weights ``theta``::

    theta_k <- opt applied H times to theta on worker k's own batches     (no communication)
    theta_bar = (1/K) sum_k theta_k                                        (one all-reduce)
    theta <- theta_bar                                      (plain Local SGD), or, with an outer optimizer,
    Delta = theta - theta_bar;  m <- mu m + Delta;  theta <- theta - lr_out (Delta + mu m)  (Nesterov, DiLoCo)

Post-local SGD (Lin et al., ICLR 2020; Gu, Lyu, Huang & Arora, ICLR 2023): for the first T steps the workers
all-reduce gradients every step (ordinary data-parallel SGD with batch K*B), then switch to local rounds.
H comes from a :mod:`~hdopt.distributed.schedules` schedule asked at each round's first step. Floating-point
buffers (BatchNorm running statistics) are averaged with the parameters; optimizer state (momentum, Adam
moments) optionally.

The same object drives K replicas held in this process (the simulated mode) or one replica per process over
torch.distributed, or both; the averages are the same numbers (see :mod:`~hdopt.distributed.averaging`).

Why not ``torch.distributed.algorithms`` PostLocalSGDOptimizer + PeriodicModelAverager: the averager has a
fixed period and averages parameters only (no buffers, optimizer state, outer step, adaptive period), and it
needs a process group, so it cannot run the simulated mode.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.optim import Optimizer

from hdopt.distributed.averaging import ReplicaAverager, payload_bytes
from hdopt.distributed.comm import Communicator
from hdopt.distributed.consistency import check_consistent, fingerprint
from hdopt.distributed.schedules import ConstantPeriod, PhasePeriod, QSRPeriod, SyncSchedule

SCHEDULES = ("constant", "phase", "qsr")


@dataclass
class LocalSGDConfig:
    """Local SGD settings (validated once, here).

    Attributes:
        period: H for ``schedule="constant"``; H_base for ``"qsr"``.
        schedule: "constant", "phase" (``phase_milestones``/``phase_periods``) or "qsr" (``qsr_alpha``).
        phase_milestones: steps where the phase schedule changes H.
        phase_periods: H per phase (one more than milestones).
        qsr_alpha: alpha of the Quadratic Synchronization Rule.
        max_period: cap on H for QSR (the lr may reach 0 at the end of a cosine schedule).
        post_local_steps: T, the number of initial data-parallel steps (gradient all-reduce every step).
        average_buffers: average floating-point buffers (BatchNorm running statistics) at every sync.
        average_optimizer_state: average the optimizer's per-parameter tensors (momentum, Adam moments).
        outer_lr, outer_momentum, outer_nesterov: the outer SGD step on the averaged delta (DiLoCo);
            the default (1, 0, False) is plain averaging.
    """

    period: int = 16
    schedule: str = "constant"
    phase_milestones: tuple[int, ...] = ()
    phase_periods: tuple[int, ...] = ()
    qsr_alpha: float = 0.0
    max_period: int = 1 << 20
    post_local_steps: int = 0
    average_buffers: bool = True
    average_optimizer_state: bool = False
    outer_lr: float = 1.0
    outer_momentum: float = 0.0
    outer_nesterov: bool = False

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not isinstance(self.post_local_steps, int) or self.post_local_steps < 0:
            raise ValueError(f"post_local_steps must be an integer >= 0, got {self.post_local_steps!r}")
        if not self.outer_lr > 0:
            raise ValueError(f"outer_lr must be > 0, got {self.outer_lr}")
        if not 0.0 <= self.outer_momentum < 1.0:
            raise ValueError(f"outer_momentum must be in [0, 1), got {self.outer_momentum}")
        if self.outer_nesterov and self.outer_momentum == 0:
            raise ValueError("outer_nesterov needs outer_momentum > 0")
        self.phase_milestones = tuple(self.phase_milestones)
        self.phase_periods = tuple(self.phase_periods)
        self.sync_schedule()  # validates the schedule's own fields

    def sync_schedule(self) -> SyncSchedule:
        """The schedule object these settings describe."""
        if self.schedule == "phase":
            return PhasePeriod(self.phase_milestones, self.phase_periods)
        if self.schedule == "qsr":
            return QSRPeriod(self.period, self.qsr_alpha, self.max_period)
        return ConstantPeriod(self.period)

    @property
    def has_outer(self) -> bool:
        return not (self.outer_lr == 1.0 and self.outer_momentum == 0.0)


@dataclass
class SyncRound:
    """One averaging round: it ended at global ``step`` after ``period`` local steps."""

    step: int
    period: int
    lr: float
    bytes: int
    seconds: float


@dataclass
class _Counters:
    step: int = 0
    local_steps: int = 0
    period: int | None = None
    bytes: int = 0
    rounds: list[SyncRound] = field(default_factory=list)


class OuterSGD:
    """The outer step on the averaged delta: SGD (optionally Nesterov) on anchor copies of the parameters.

    ``Delta = anchor - theta_bar`` plays the gradient; torch.optim.SGD does the update, so lr, momentum and
    Nesterov follow torch's definitions exactly.
    """

    def __init__(self, params: Sequence[torch.Tensor], lr: float, momentum: float, nesterov: bool):
        self.anchors = [p.detach().clone() for p in params]
        self.optimizer = torch.optim.SGD(self.anchors, lr=lr, momentum=momentum, nesterov=nesterov)

    @torch.no_grad()
    def step(self, averaged: Sequence[torch.Tensor]) -> None:
        """Move the anchors with ``Delta = anchor - averaged`` and write them into ``averaged``."""
        for a, avg in zip(self.anchors, averaged, strict=True):
            a.grad = a - avg
        self.optimizer.step()
        for a, avg in zip(self.anchors, averaged, strict=True):
            avg.copy_(a)

    def state_dict(self) -> dict:
        return {"anchors": [a.clone() for a in self.anchors], "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for a, saved in zip(self.anchors, state["anchors"], strict=True):
                a.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])


class LocalSGD:
    """Local SGD over the replicas held here (``K`` models) and the processes of ``comm`` (``N`` ranks).

    Args:
        models: one model, or K models (the simulated mode; they must start from identical weights).
        optimizers: the matching optimizer(s), any ``torch.optim.Optimizer``.
        config: :class:`LocalSGDConfig`.
        comm: the communicator over processes (None: the default process group if torch.distributed is
            initialized, else one process). At construction, ranks compare config, model layout, initial
            weights and optimizer settings, and refuse to start on a mismatch.

    Usage (the same loop for both modes)::

        sgd = LocalSGD(models, optimizers, LocalSGDConfig(period=16))
        for step in range(steps):
            for model, opt, (x, y) in zip(models, optimizers, batches):   # each replica, its own batch
                opt.zero_grad(); loss_fn(model(x), y).backward()
            sgd.step()        # inner steps, plus a gradient or parameter all-reduce when due

    Learning rates: the first replica's param groups lead; their hyperparameters are copied to the other
    replicas before every step, so an lr scheduler attached to ``optimizers[0]`` drives all of them.
    """

    def __init__(self, models: nn.Module | Sequence[nn.Module], optimizers: Optimizer | Sequence[Optimizer],
                 config: LocalSGDConfig, comm: Communicator | None = None):
        self.models = [models] if isinstance(models, nn.Module) else list(models)
        self.optimizers = [optimizers] if isinstance(optimizers, Optimizer) else list(optimizers)
        if len(self.models) != len(self.optimizers) or not self.models:
            raise ValueError(f"need one optimizer per model, got {len(self.models)} models and "
                             f"{len(self.optimizers)} optimizers")
        self.config = config
        self.schedule = config.sync_schedule()
        self.comm = comm if comm is not None else Communicator()
        self.averager = ReplicaAverager(self.comm)
        self._check_replicas()
        self.counters = _Counters()
        self.outer = (OuterSGD(self._params(0), config.outer_lr, config.outer_momentum, config.outer_nesterov)
                      if config.has_outer else None)

    # -- set-up ---------------------------------------------------------------------------------------
    def _check_replicas(self) -> None:
        record = fingerprint(self.config, self.models[0], self.optimizers[0])
        for k in range(1, len(self.models)):
            other = fingerprint(self.config, self.models[k], self.optimizers[k])
            # hyperparameters may differ (a scheduler on the lead adds initial_lr): the lead's are copied
            bad = [key for key in record if other.get(key) != record[key] and "hyperparameters" not in key]
            if bad:
                raise ValueError(f"replica {k} differs from replica 0 in {bad}: Local SGD replicas must "
                                 "start from identical weights and settings (build them with copy.deepcopy)")
        check_consistent(record, self.comm, "Local SGD")

    def _params(self, k: int) -> list[torch.Tensor]:
        return [p for g in self.optimizers[k].param_groups for p in g["params"]]

    def _buffers(self, k: int) -> list[torch.Tensor]:
        return [b for b in self.models[k].buffers() if b.is_floating_point()]

    def _optimizer_tensors(self, k: int) -> list[torch.Tensor]:
        opt = self.optimizers[k]
        out = []
        for p in self._params(k):
            state = opt.state.get(p, {})
            out += [state[key] for key in sorted(state)
                    if isinstance(state[key], torch.Tensor) and state[key].shape == p.shape
                    and state[key].is_floating_point()]
        return out

    # -- properties -------------------------------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict]:
        """The lead replica's param groups (an lr scheduler on ``optimizers[0]`` changes these)."""
        return self.optimizers[0].param_groups

    @property
    def step_count(self) -> int:
        return self.counters.step

    @property
    def rounds(self) -> list[SyncRound]:
        """The averaging rounds so far (the sync-round log)."""
        return self.counters.rounds

    @property
    def bytes_communicated(self) -> int:
        """Payload bytes one worker has all-reduced so far (post-local gradients, then the averages)."""
        return self.counters.bytes

    @property
    def period(self) -> int | None:
        """H of the current round (None before the first local round starts)."""
        return self.counters.period

    @property
    def in_local_phase(self) -> bool:
        return self.counters.step >= self.config.post_local_steps

    # -- the step ---------------------------------------------------------------------------------------
    def step(self) -> bool:
        """One step of every local replica (gradients in ``.grad``). Returns True if it synchronized."""
        self._copy_hyperparameters()
        c = self.counters
        if not self.in_local_phase:
            self._all_reduce_gradients()
            for opt in self.optimizers:
                opt.step()
            c.step += 1
            if self.outer is not None and self.in_local_phase:
                self._reset_anchors()
            return False
        if c.local_steps == 0:
            c.period = self.schedule.period(c.step, float(self.param_groups[0]["lr"]))
        for opt in self.optimizers:
            opt.step()
        c.step += 1
        c.local_steps += 1
        if c.local_steps >= c.period:
            self.synchronize()
            return True
        return False

    def _copy_hyperparameters(self) -> None:
        lead = self.optimizers[0].param_groups
        for opt in self.optimizers[1:]:
            for g_lead, g in zip(lead, opt.param_groups, strict=True):
                for key, value in g_lead.items():
                    if key not in ("params", "param_names"):
                        g[key] = value

    @torch.no_grad()
    def _all_reduce_gradients(self) -> None:
        """Post-local phase: average the gradients and the float buffers (each replica updated its own)."""
        per_replica = []
        for k in range(len(self.models)):
            grads = []
            for p in self._params(k):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
            per_replica.append(grads + self._buffers(k))
        what = f"gradient all-reduce at step {self.step_count}"
        self.counters.bytes += self.averager.average_(per_replica, what)

    def _sync_tensors(self, k: int) -> list[torch.Tensor]:
        tensors = self._params(k)
        if self.config.average_buffers:
            tensors += self._buffers(k)
        if self.config.average_optimizer_state:
            tensors += self._optimizer_tensors(k)
        return tensors

    @torch.no_grad()
    def synchronize(self) -> SyncRound | None:
        """Average parameters (buffers, optimizer state) now; starts a new round, logs a SyncRound.

        Called by :meth:`step` at the end of each round; call it yourself to average a partial last round.
        Returns None (and communicates nothing) when no local step was taken since the last average.
        """
        c = self.counters
        if c.local_steps == 0:
            return None
        start = time.perf_counter()
        what = f"Local SGD averaging at step {c.step}"
        # one collective per dtype: parameters, then buffers and optimizer tensors when asked for
        sent = self.averager.average_([self._sync_tensors(k) for k in range(len(self.models))], what)
        if self.outer is not None:
            self.outer.step(self._params(0))
            for k in range(1, len(self.models)):
                for p, p0 in zip(self._params(k), self._params(0), strict=True):
                    p.copy_(p0)
        record = SyncRound(c.step, c.local_steps, float(self.param_groups[0]["lr"]), sent,
                           time.perf_counter() - start)
        c.rounds.append(record)
        c.bytes += sent
        c.local_steps = 0
        return record

    def _reset_anchors(self) -> None:
        with torch.no_grad():
            for a, p in zip(self.outer.anchors, self._params(0), strict=True):
                a.copy_(p)

    # -- state ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Counters, the sync-round log, the outer optimizer and every local optimizer's state_dict."""
        c = self.counters
        return {
            "step": c.step, "local_steps": c.local_steps, "period": c.period, "bytes": c.bytes,
            "rounds": [asdict(r) for r in c.rounds],
            "outer": self.outer.state_dict() if self.outer is not None else None,
            "optimizers": [opt.state_dict() for opt in self.optimizers],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved (the models' weights are loaded separately)."""
        if len(state["optimizers"]) != len(self.optimizers):
            raise ValueError(f"the state holds {len(state['optimizers'])} replicas, this LocalSGD has "
                             f"{len(self.optimizers)}")
        if (state["outer"] is None) != (self.outer is None):
            raise ValueError("the state and this LocalSGD disagree on whether an outer optimizer is used")
        self.counters = _Counters(state["step"], state["local_steps"], state["period"], state["bytes"],
                                  [SyncRound(**r) for r in state["rounds"]])
        if self.outer is not None:
            self.outer.load_state_dict(state["outer"])
        for opt, saved in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(saved)

    def comm_bytes_per_step(self) -> float:
        """Average payload per step so far."""
        return self.counters.bytes / max(1, self.counters.step)


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the trainable parameters (what one gradient all-reduce or one averaging round sends)."""
    return payload_bytes([p for p in model.parameters() if p.requires_grad])
