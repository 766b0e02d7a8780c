"""Start-up checks: every rank must run the same configuration from the same weights.

A *fingerprint* is a flat ``{field: text}`` record of what must agree across ranks: the config, the optimizer
and its hyperparameters, the parameter names/shapes/dtypes and a checksum of the initial weights. Ranks
exchange fingerprints once (:func:`check_consistent`) and refuse to start when any field differs, naming the
field and the ranks. A silent mismatch would otherwise average unrelated models, or make data-parallel ZO
ranks draw different directions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from hdopt.distributed.comm import Communicator, ConfigMismatchError
from hdopt.zo import ZOOptimizer
from hdopt.zo.base import IDENTITY

_SKIP_GROUP_KEYS = ("params", "param_names")


def _text(obj: Any) -> str:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    return json.dumps(obj, sort_keys=True, default=repr)


@torch.no_grad()
def model_fingerprint(model: nn.Module) -> dict[str, str]:
    """Parameter/buffer names, shapes and dtypes, and a float64 checksum of their values."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    layout = [(name, tuple(t.shape), str(t.dtype)) for name, t in tensors]
    sums = [(float(t.double().sum()), float(t.double().pow(2).sum())) if t.is_floating_point()
            else (float(t.sum()), 0.0) for _, t in tensors]
    digest = hashlib.sha256(_text(sums).encode()).hexdigest()[:16]
    return {"model layout": _text(layout), "initial weights": f"checksum {digest}"}


def optimizer_fingerprint(optimizer: Optimizer) -> dict[str, str]:
    """The optimizer class, its per-group hyperparameters and, for hdopt.zo optimizers, what decides the
    directions (seed, noise, q, estimator) as a field of its own."""
    identity = IDENTITY if isinstance(optimizer, ZOOptimizer) else ()
    skip = _SKIP_GROUP_KEYS + identity
    groups = [{k: v for k, v in g.items() if k not in skip} | {"size": len(g["params"])}
              for g in optimizer.param_groups]
    record = {"optimizer": type(optimizer).__name__, "optimizer hyperparameters": _text(groups)}
    if identity:
        record["zo seed and estimator"] = _text({k: optimizer.param_groups[0][k] for k in identity})
    return record


def fingerprint(config: Any = None, model: nn.Module | None = None,
                optimizer: Optimizer | None = None) -> dict[str, str]:
    """The fields that must agree across ranks (any of the three may be omitted)."""
    record: dict[str, str] = {}
    if config is not None:
        record["config"] = _text(config)
    if model is not None:
        record.update(model_fingerprint(model))
    if optimizer is not None:
        record.update(optimizer_fingerprint(optimizer))
    return record


def check_consistent(record: dict[str, str], comm: Communicator, what: str = "run") -> None:
    """Exchange fingerprints and raise :class:`ConfigMismatchError` on every rank if any field differs.

    Args:
        record: this rank's fingerprint (see :func:`fingerprint`).
        comm: the communicator (a no-op in one process).
        what: names the checked object in the message.
    """
    records = comm.all_gather_object(record, f"start-up check of the {what} configuration")
    problems = []
    for key in sorted(set().union(*records)):
        values = [r.get(key) for r in records]
        odd = [rank for rank, v in enumerate(values) if v != values[0]]
        if odd:
            shown = "; ".join(f"rank {r}: {_difference(values[0], values[r])}" for r in odd[:3])
            problems.append(f"{key} differs (rank 0 vs ranks {odd}): {shown}")
    if problems:
        raise ConfigMismatchError(
            f"refusing to start the {what}: ranks were launched with different settings: "
            + " | ".join(problems)
            + ". Launch every rank with the same config and seeds (and build the model from the same seed, "
            "or call hdopt.distributed.broadcast_parameters(model, comm) before wrapping it)."
        )


def _difference(mine: str | None, theirs: str | None, limit: int = 160) -> str:
    """``field: a vs b`` for the differing fields of two JSON objects, else both values (shortened)."""
    try:
        a, b = json.loads(mine), json.loads(theirs)
    except (TypeError, ValueError):
        a = b = None
    if isinstance(a, dict) and isinstance(b, dict):
        keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        return ", ".join(f"{k}: {a.get(k)} vs {b.get(k)}" for k in keys)[:limit]

    def short(v: str | None) -> str:
        return "missing" if v is None else (v if len(v) <= limit // 2 else v[:limit // 2] + "...")

    return f"{short(mine)} vs {short(theirs)}"


@torch.no_grad()
def broadcast_parameters(model: nn.Module, comm: Communicator, src: int = 0) -> None:
    """Overwrite every rank's parameters and buffers with rank ``src``'s (as DDP does at construction)."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        comm.broadcast_(t.data, src, f"broadcast of {name}")
