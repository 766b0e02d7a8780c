"""Forward-only (zeroth-order) optimization: MeZO and successors, as torch.optim optimizers.

Depends on torch only. Pieces: :mod:`~hdopt.zo.noise` (seeded counter-based noise),
:mod:`~hdopt.zo.directions` (where a perturbation direction comes from: the rules' extension point),
:mod:`~hdopt.zo.perturb` (evaluating the loss at perturbed weights without writing them),
:mod:`~hdopt.zo.base` (the SPSA estimate and the optimizer contract), :mod:`~hdopt.zo.optim` (the classic
update rules), :mod:`~hdopt.zo.rounding` (stochastic rounding), :mod:`~hdopt.zo.trajectory` (the per-step log
and replay) and :mod:`~hdopt.zo.registry` (the optimizers by name).
"""

from hdopt.zo.base import NonFiniteLossError, Reduce, ZOOptimizer
from hdopt.zo.directions import Directions
from hdopt.zo.fzoo import FZOO
from hdopt.zo.hizoo import HiZOO
from hdopt.zo.lozo import LOZO
from hdopt.zo.noise import GAUSSIAN, RADEMACHER, NoiseGenerator, derive_key, noise
from hdopt.zo.optim import ZOSGD, ZOAdam, ZOConservative, ZOSign
from hdopt.zo.registry import OPTIMIZERS, optimizer_class, optimizer_name
from hdopt.zo.sparse_mezo import SparseMeZO
from hdopt.zo.trajectory import Trajectory, UpdateRecord, replay

__all__ = [
    "GAUSSIAN",
    "LOZO",
    "OPTIMIZERS",
    "RADEMACHER",
    "Directions",
    "FZOO",
    "HiZOO",
    "NoiseGenerator",
    "NonFiniteLossError",
    "Reduce",
    "SparseMeZO",
    "Trajectory",
    "UpdateRecord",
    "ZOAdam",
    "ZOConservative",
    "ZOOptimizer",
    "ZOSGD",
    "ZOSign",
    "derive_key",
    "noise",
    "optimizer_class",
    "optimizer_name",
    "replay",
]
