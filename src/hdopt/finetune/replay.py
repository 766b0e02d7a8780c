"""Rebuild a ZO run's weights from its starting model and its trajectory (seeds + projected gradients)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from hdopt.finetune.checkpoint import load_checkpoint, tensors_digest
from hdopt.finetune.kinds import ZOKind
from hdopt.finetune.methods import get_method
from hdopt.finetune.trained import replay_to, run_config, run_start


def rebuild(folder: str | Path, model=None, tokenizer=None, upto: int | None = None):
    """The run's model with its trainable weights rebuilt by replaying ``upto`` steps (default: all).

    Args:
        folder: a ZO run folder (config.json + trajectory.bin).
        model, tokenizer: the starting model, if already loaded (else loaded as the run did); it must be the
            run's (the sha256 the run recorded of it).
        upto: number of steps to replay.

    Returns:
        ``(model, named trainable parameters, steps replayed)``.
    """
    folder = Path(folder)
    cfg = run_config(folder)
    method = get_method(cfg.method.method)
    if not issubclass(method.kind, ZOKind):
        raise ValueError(f"{folder} is a {method.name} run: only ZO runs have a trajectory to replay")
    record, model, _, params = run_start(folder, cfg, method, model, tokenizer)  # --zo-blocks: top blocks'
    steps = replay_to(folder, params, upto, record)
    return model, params, steps


def compare_with_checkpoint(params, checkpoint: str | Path) -> tuple[bool, float]:
    """``(bitwise equal, max |difference|)`` between ``params`` and a checkpoint's weights; a checkpoint
    without weights (a ZO run's, by default) is compared through its sha256 (difference NaN if unequal)."""
    weights, _, meta = load_checkpoint(checkpoint)
    if not weights:
        equal = tensors_digest(params) == meta.get("weights_sha256")
        return equal, 0.0 if equal else math.nan
    equal, worst = True, 0.0
    for name, p in params:
        w = weights[name].to(p.device)
        equal &= torch.equal(p.detach(), w)
        worst = max(worst, float((p.detach().double() - w.double()).abs().max()))
    return equal, worst


def matches(params, digest: str | None) -> bool | None:
    """Whether ``params`` are bitwise the weights of ``digest`` (None: no digest to compare with)."""
    return None if digest is None else tensors_digest(params) == digest
