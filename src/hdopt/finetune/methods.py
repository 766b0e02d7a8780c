"""The methods registry: each fine-tuning method is a record (how it trains, what it trains, its defaults).

Defaults follow the MeZO paper's tables (references/mezo.md, Tables 15-16), except the full-parameter MeZO
learning rate: a 135M model wants 1e-5 (measured on SST-2: 1e-6 barely moves in 300 steps, 1e-5 reaches
69% dev accuracy), not OPT-13B's 1e-6/1e-7. Every default can be overridden from the config or the CLI.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hdopt.finetune.adapters import ADAPTERS
from hdopt.finetune.kinds import KINDS, MethodKind
from hdopt.registry import Registry


class MethodError(ValueError):
    """Unknown or duplicate method; the message lists the registered ones."""


@dataclass(frozen=True)
class Method:
    """A fine-tuning method: a kind of training, an adapter and defaults.

    Args:
        name: registry key, e.g. ``mezo-lora``.
        kind: how it trains: a :class:`~hdopt.finetune.kinds.MethodKind` subclass or a registered kind name,
            ``zo`` (forward passes only, :mod:`hdopt.zo`), ``fo`` (backprop), ``np`` (node perturbation,
            forward passes only) or ``lp`` (linear probe).
        adapter: what is trained, a registered adapter (:mod:`hdopt.finetune.adapters`): ``full`` (all
            weights), ``lora``, ``prefix``, ``head`` (the LM head, untied from the input embedding),
            ``readout`` (the last block's query, output and MLP maps), ``read`` (read-position adapters) or
            ``none`` (a separate linear probe).
        defaults: config field -> value, for the fields a run leaves at ``None`` (after the optimizer's
            ``paper_defaults``).
        description: one line for ``--help`` and the docs.
        without_label_words: the method that runs instead on tasks without fixed label words (multiple
            choice, generation); ``lp`` -> head tuning. ``None``: this method runs on every task.
    """

    name: str
    kind: type[MethodKind] | str
    adapter: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    without_label_words: Method | None = None

    def __post_init__(self) -> None:
        if isinstance(self.kind, str):
            if self.kind not in KINDS:
                raise MethodError(f"method {self.name!r}: kind must be one of {', '.join(KINDS)} or a "
                                  f"MethodKind class, got {self.kind!r}")  # fmt: skip
            object.__setattr__(self, "kind", KINDS.get(self.kind))
        elif not (isinstance(self.kind, type) and issubclass(self.kind, MethodKind)):
            raise MethodError(f"method {self.name!r}: kind must be a MethodKind class, got {self.kind!r}")
        if self.adapter not in ADAPTERS:
            raise MethodError(f"method {self.name!r}: adapter must be one of {', '.join(ADAPTERS)}")

    @property
    def trainer(self) -> str:
        """The kind's name (``zo``, ``fo``, ``lp``), as config.json's method record stores it."""
        return self.kind.name

    def for_task(self, task) -> Method:
        """The method that runs on ``task`` (an :class:`hdopt.lm.tasks.Task`): this one, or its variant for
        tasks without fixed label words."""
        if self.without_label_words is not None and not task.label_words:
            return self.without_label_words
        return self


METHODS: Registry[Method] = Registry("method", error=MethodError)


def register_method(method: Method) -> Method:
    """Add a method; a name can be registered once."""
    return METHODS.register(method.name, method)


def get_method(name: str) -> Method:
    """The method called ``name``; an unknown name raises :class:`MethodError` listing the known ones."""
    return METHODS.get(name)


def list_methods() -> list[str]:
    return sorted(METHODS)


# ZO: batch 16, constant lr, 20k steps (OPT, Table 16); evaluation every 500 steps; one Gaussian direction
# and the central (two-point) estimate, as MeZO; an optimizer's paper_defaults take precedence over these.
_ZO = {"optimizer": "zosgd", "batch_size": 16, "steps": 20000, "schedule": "constant", "eval_every": 500,
       "q": 1, "noise": "gaussian", "estimator": "central"}  # fmt: skip
# Backprop: AdamW, batch 8, linear decay, 5 epochs of 1000 examples = 625 steps.
_FO = {"optimizer": "adamw", "batch_size": 8, "steps": 625, "schedule": "linear", "eval_every": 125}

register_method(Method("mezo", "zo", "full", {**_ZO, "lr": 1e-5, "eps": 1e-3},
                       "MeZO: ZO-SGD on all weights (Malladi et al. 2023)"))  # fmt: skip
register_method(Method("mezo-lora", "zo", "lora", {**_ZO, "lr": 1e-4, "eps": 1e-2},
                       "MeZO on LoRA adapters (q, v; r 8, alpha 16)"))  # fmt: skip
register_method(Method("mezo-prefix", "zo", "prefix", {**_ZO, "lr": 1e-2, "eps": 1e-1},
                       "MeZO on 5 prefix key/value tokens per layer (activation init)"))  # fmt: skip
# Node perturbation: the last block's readout maps from forward passes (8 directions, central estimate),
# AdamW on the estimate; lr 3e-4 is the choice on dev of benchmarks/zo_convergence.py's grids on SST-2 and
# MR (SmolLM2), eps 1e-2 hdopt's choice.
register_method(Method("node-perturbation", "np", "readout",
                       {"optimizer": "adamw", "batch_size": 16, "steps": 2000, "schedule": "constant",
                        "eval_every": 100, "lr": 3e-4, "eps": 1e-2, "q": 8, "noise": "gaussian",
                        "estimator": "central"},
                       "node perturbation: the last block's readout maps (query, output, MLP) from forward "
                       "passes, the bottom's states cached"))  # fmt: skip
# Node perturbation of read-position adapters (rank 8 in every block, at the prompt's last token; the
# context's keys and values cached): N = 16 one-sided directions (as good as 16 central ones at half the
# copies: benchmarks/read_adapters_ceiling.py), AdamW on the estimate; lr and steps: benchmarks/
# zo_convergence.py's SST-2 grid (SmolLM2), eps 1e-2 as node-perturbation's.
register_method(Method("read-adapters", "np-read", "read",
                       {"optimizer": "adamw", "batch_size": 16, "steps": 800, "schedule": "constant",
                        "eval_every": 50, "lr": 1e-3, "eps": 1e-2, "q": 16, "noise": "gaussian",
                        "estimator": "one-sided"},
                       "node perturbation of read-position adapters: a rank-8 bottleneck in every block "
                       "at the prompt's last token, from forward passes, the context's keys and values "
                       "cached"))  # fmt: skip
# The same adapters with the exact read-path gradient from forward passes: forward differences along each
# of the L x r bottleneck coordinates (no directions drawn: 1 + L r copies, 125 copies of the whole path on
# SmolLM2), AdamW on it; batch 8, lr and steps: benchmarks/zo_convergence.py's SST-2 grid.
register_method(Method("read-adapters-exact", "np-read", "read",
                       {"optimizer": "adamw", "batch_size": 8, "steps": 400, "schedule": "constant",
                        "eval_every": 50, "lr": 3e-3, "eps": 1e-2, "estimator": "coordinates"},
                       "read-position adapters trained on their exact gradient from forward passes (forward "
                       "differences along every bottleneck coordinate), the context's keys and values "
                       "cached"))  # fmt: skip
register_method(Method("ft", "fo", "full", {**_FO, "lr": 1e-5}, "full fine-tuning with AdamW"))
register_method(Method("ft-lora", "fo", "lora", {**_FO, "lr": 1e-4}, "LoRA fine-tuning with AdamW"))
register_method(Method("ft-prefix", "fo", "prefix", {**_FO, "lr": 1e-2}, "prefix-tuning with AdamW"))
# lp on tasks without fixed label words (multiple choice, generation) is MeZO's head tuning: the LM head
# alone, untied from the input embedding, trained with the backprop recipe above. lr 1e-4 (10x FT's: one
# matrix moves) is hdopt's choice, not a value from the paper's tables.
HEAD_TUNING = Method("lp", "fo", "head", {**_FO, "lr": 1e-4},
                     "head tuning: the LM head alone (untied from the input embedding), AdamW")  # fmt: skip
register_method(Method("lp", "lp", "none", {"eval_every": 0},
                       "linear probe: logistic regression on frozen last-token features (label-word tasks); "
                       "head tuning (the LM head with AdamW) on multiple-choice and generation tasks",
                       without_label_words=HEAD_TUNING))  # fmt: skip
