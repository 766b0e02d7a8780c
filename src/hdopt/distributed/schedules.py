"""Synchronization schedules: how many local steps H the next Local SGD round takes.

A schedule is asked once per round, at the round's first step, with the global step and the current learning
rate (so an lr scheduler drives it):

* :class:`ConstantPeriod` — H fixed (Lin et al., "Don't use large mini-batches, use local SGD", ICLR 2020).
* :class:`PhasePeriod` — one H per training phase, changing at given steps (e.g. at the lr decays, as in
  Gu, Lyu, Huang & Arora, ICLR 2023, which grows H when the lr is small).
* :class:`QSRPeriod` — the Quadratic Synchronization Rule (Gu, Lyu, Arora, Zhang & Huang, ICLR 2024):
  ``H_t = max(H_base, floor((alpha / eta_t)^2))``, re-evaluated after each averaging round; as the lr decays
  (cosine) the rounds grow quadratically, which keeps the sharpness-reducing drift of Local SGD while
  cutting communication.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol


class SyncSchedule(Protocol):
    def period(self, step: int, lr: float) -> int:
        """H for the round that starts at global step ``step`` with learning rate ``lr``."""


@dataclass(frozen=True)
class ConstantPeriod:
    """``H`` local steps per round."""

    h: int

    def __post_init__(self) -> None:
        if not isinstance(self.h, int) or self.h < 1:
            raise ValueError(f"the period H must be an integer >= 1, got {self.h!r}")

    def period(self, step: int, lr: float) -> int:
        return self.h


@dataclass(frozen=True)
class PhasePeriod:
    """``periods[i]`` local steps per round while ``milestones[i-1] <= step < milestones[i]``.

    Example: ``PhasePeriod((3000, 4500), (4, 16, 64))`` — H = 4 before step 3000, 16 until 4500, then 64.
    """

    milestones: tuple[int, ...]
    periods: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.periods) != len(self.milestones) + 1:
            raise ValueError(f"a phase schedule needs one more period than milestones, got "
                             f"{len(self.milestones)} milestones and {len(self.periods)} periods")
        if list(self.milestones) != sorted(set(self.milestones)) or any(m < 0 for m in self.milestones):
            raise ValueError(f"milestones must be increasing non-negative steps, got {self.milestones}")
        if any(not isinstance(h, int) or h < 1 for h in self.periods):
            raise ValueError(f"every period must be an integer >= 1, got {self.periods}")

    def period(self, step: int, lr: float) -> int:
        phase = sum(step >= m for m in self.milestones)
        return self.periods[phase]


@dataclass(frozen=True)
class QSRPeriod:
    """Quadratic Synchronization Rule: ``H = max(base, floor((alpha / lr)^2))``, capped at ``max_period``.

    ``alpha`` is usually chosen so that the rule starts to bite part-way through a cosine decay (the paper
    tunes it per setup): H stays at H_base until the lr falls below alpha / sqrt(H_base).
    """

    base: int
    alpha: float
    max_period: int = 1 << 20

    def __post_init__(self) -> None:
        if not isinstance(self.base, int) or self.base < 1:
            raise ValueError(f"QSR's H_base must be an integer >= 1, got {self.base!r}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"QSR's alpha must be a finite number > 0, got {self.alpha}")
        if self.max_period < self.base:
            raise ValueError(f"max_period ({self.max_period}) must be >= H_base ({self.base})")

    def period(self, step: int, lr: float) -> int:
        if lr <= 0:
            return self.max_period
        ratio = (self.alpha / lr) ** 2
        return self.max_period if ratio >= self.max_period else max(self.base, math.floor(ratio))
