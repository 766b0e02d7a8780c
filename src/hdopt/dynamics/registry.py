"""The registry of lab experiments: each experiment module registers itself once, by name.

An :class:`Experiment` is data: a name, a one-line claim, a config dataclass with one preset per scale, and
the ``run(config, out_dir, data=None) -> LabResult`` recipe. Registering a name twice is an error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SCALES = ("smoke", "default", "full")


@dataclass(frozen=True)
class Experiment:
    """One ``hdopt lab`` experiment.

    Attributes:
        name: CLI name.
        claim: the one-line statement the experiment checks.
        config_cls: its config dataclass.
        presets: ``{scale: config}`` for every scale in :data:`SCALES`.
        run: ``run(config, out_dir, data=None) -> LabResult``.
    """

    name: str
    claim: str
    config_cls: type
    presets: dict[str, Any]
    run: Callable[..., Any]

    def config(self, scale: str = "default", **overrides: Any) -> Any:
        """The preset for ``scale`` with ``overrides`` applied (unknown fields raise TypeError)."""
        if scale not in self.presets:
            raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
        return dataclasses.replace(self.presets[scale], **overrides)


_REGISTRY: dict[str, Experiment] = {}


def register(experiment: Experiment) -> Experiment:
    """Add ``experiment``; a second experiment with the same name raises ValueError."""
    if experiment.name in _REGISTRY:
        raise ValueError(f"experiment {experiment.name!r} is already registered")
    missing = set(SCALES) - set(experiment.presets)
    if missing:
        raise ValueError(f"experiment {experiment.name!r} lacks presets for {sorted(missing)}")
    _REGISTRY[experiment.name] = experiment
    return experiment


def get(name: str) -> Experiment:
    """The experiment called ``name`` (importing the built-in ones first)."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(names())}")
    return _REGISTRY[name]


def names() -> list[str]:
    """Registered experiment names, in registration order."""
    _load_builtin()
    return list(_REGISTRY)


def _load_builtin() -> None:
    # Modules register their experiments on import (hdopt.dynamics.experiments imports all of them).
    import hdopt.dynamics.experiments  # noqa: F401
