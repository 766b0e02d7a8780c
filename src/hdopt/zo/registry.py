"""The zeroth-order optimizers by name: the one list the CLI, the trainer, replay and the report read.

Adding an optimizer: its module in hdopt.zo, and one line here.
"""

from __future__ import annotations

from hdopt.registry import Registry
from hdopt.zo.base import ZOOptimizer
from hdopt.zo.fzoo import FZOO
from hdopt.zo.hizoo import HiZOO
from hdopt.zo.lozo import LOZO
from hdopt.zo.optim import ZOSGD, ZOAdam, ZOConservative, ZOSign
from hdopt.zo.sparse_mezo import SparseMeZO

OPTIMIZERS: Registry[type[ZOOptimizer]] = Registry("zeroth-order optimizer", listing="known:", sort=False)
OPTIMIZERS.register("zosgd", ZOSGD)
OPTIMIZERS.register("zoadam", ZOAdam)
OPTIMIZERS.register("zosign", ZOSign)
OPTIMIZERS.register("zoconservative", ZOConservative)
OPTIMIZERS.register("fzoo", FZOO)
OPTIMIZERS.register("hizoo", HiZOO)
OPTIMIZERS.register("lozo", LOZO)
OPTIMIZERS.register("sparse-mezo", SparseMeZO)


def optimizer_class(name: str) -> type[ZOOptimizer]:
    """The optimizer registered as ``name`` (or whose class is named ``name``, as trajectory files say)."""
    for cls in OPTIMIZERS.values():
        if cls.__name__ == name:
            return cls
    return OPTIMIZERS.get(name)


def optimizer_name(optimizer: ZOOptimizer | type[ZOOptimizer]) -> str:
    """The registry name of an optimizer (instance or class)."""
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    for name in OPTIMIZERS:
        if OPTIMIZERS.get(name) is cls:
            return name
    raise ValueError(f"{cls.__name__} is not registered in hdopt.zo.registry")
