"""Forward-only (zeroth-order) optimization: MeZO and successors, as torch.optim optimizers.

Depends on torch only. Pieces: :mod:`~hdopt.zo.noise` (seeded counter-based noise),
:mod:`~hdopt.zo.perturb` (evaluating the loss at perturbed weights without writing them),
:mod:`~hdopt.zo.optim` (estimators and update rules), :mod:`~hdopt.zo.rounding` (stochastic rounding),
:mod:`~hdopt.zo.trajectory` (the per-step log and replay).
"""

from hdopt.zo.noise import GAUSSIAN, RADEMACHER, NoiseGenerator, derive_key, noise
from hdopt.zo.optim import (
    OPTIMIZERS,
    ZOSGD,
    NonFiniteLossError,
    ZOAdam,
    ZOConservative,
    ZOOptimizer,
    ZOSign,
)
from hdopt.zo.trajectory import Trajectory, UpdateRecord, replay

__all__ = [
    "GAUSSIAN",
    "OPTIMIZERS",
    "RADEMACHER",
    "NoiseGenerator",
    "NonFiniteLossError",
    "Trajectory",
    "UpdateRecord",
    "ZOAdam",
    "ZOConservative",
    "ZOOptimizer",
    "ZOSGD",
    "ZOSign",
    "derive_key",
    "noise",
    "replay",
]
