"""The registry of lab experiments: each experiment module registers itself once, by name.

An :class:`Experiment` is data: a name, a one-line claim, a config dataclass with one preset per scale, and
the ``run(config, out_dir, data=None) -> LabResult`` recipe. Registering a name twice is an error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hdopt.registry import Registry

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


EXPERIMENTS: Registry[Experiment] = Registry("experiment", sort=False)


def register(experiment: Experiment) -> Experiment:
    """Add ``experiment``; a second experiment with the same name, or missing presets, raise ValueError."""
    missing = set(SCALES) - set(experiment.presets)
    if missing:
        raise ValueError(f"experiment {experiment.name!r} lacks presets for {sorted(missing)}")
    return EXPERIMENTS.register(experiment.name, experiment)


def get(name: str) -> Experiment:
    """The experiment called ``name`` (importing the built-in ones first)."""
    _load_builtin()
    return EXPERIMENTS.get(name)


def names() -> list[str]:
    """Registered experiment names, in registration order."""
    _load_builtin()
    return EXPERIMENTS.names()


def _load_builtin() -> None:
    # Modules register their experiments on import (hdopt.dynamics.experiments imports all of them).
    import hdopt.dynamics.experiments  # noqa: F401
