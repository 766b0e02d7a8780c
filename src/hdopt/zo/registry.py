"""The zeroth-order optimizers by name: the one list the CLI, the trainer, replay and the report read.

Adding an optimizer: its module in hdopt.zo, and one line here.
"""

from __future__ import annotations

from hdopt.zo.base import ZOOptimizer
from hdopt.zo.optim import ZOSGD, ZOAdam, ZOConservative, ZOSign

OPTIMIZERS: dict[str, type[ZOOptimizer]] = {
    "zosgd": ZOSGD,
    "zoadam": ZOAdam,
    "zosign": ZOSign,
    "zoconservative": ZOConservative,
}


def optimizer_class(name: str) -> type[ZOOptimizer]:
    """The optimizer registered as ``name`` (or whose class is named ``name``, as trajectory files say)."""
    if name in OPTIMIZERS:
        return OPTIMIZERS[name]
    for cls in OPTIMIZERS.values():
        if cls.__name__ == name:
            return cls
    raise ValueError(f"unknown zeroth-order optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")


def optimizer_name(optimizer: ZOOptimizer | type[ZOOptimizer]) -> str:
    """The registry name of an optimizer (instance or class)."""
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    for name, registered in OPTIMIZERS.items():
        if registered is cls:
            return name
    raise ValueError(f"{cls.__name__} is not registered in hdopt.zo.registry")
