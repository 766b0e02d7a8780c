"""The logistic-regression linear probe (``lp`` on label-word tasks): a closed-form fit, no steps."""

from __future__ import annotations

from pathlib import Path

from hdopt.finetune.kinds.base import MethodKind
from hdopt.finetune.probe import linear_probe


class ProbeKind(MethodKind):
    """Frozen features, then a logistic regression (:mod:`hdopt.finetune.probe`)."""

    name = "lp"
    how = "a linear probe"
    takes_steps = False

    def fit(self) -> tuple[dict, Path]:
        return linear_probe(self.run)
