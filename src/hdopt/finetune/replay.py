"""Rebuild a ZO run's weights from its starting model and its trajectory (seeds + projected gradients)."""

from __future__ import annotations

from pathlib import Path

import torch

from hdopt.finetune import rundir
from hdopt.finetune.adapters import trainable_parameters
from hdopt.finetune.checkpoint import load_checkpoint, load_weights
from hdopt.finetune.kinds import ZOKind
from hdopt.finetune.methods import get_method
from hdopt.finetune.trained import run_config, starting_model
from hdopt.lm.models import load_model
from hdopt.zo import Trajectory, replay


def rebuild(folder: str | Path, model=None, tokenizer=None, upto: int | None = None):
    """The run's model with its trainable weights rebuilt by replaying ``upto`` steps (default: all).

    Args:
        folder: a ZO run folder (config.json + trajectory.bin).
        model, tokenizer: the starting model, if already loaded (else loaded as the run did).
        upto: number of steps to replay.

    Returns:
        ``(model, named trainable parameters, steps replayed)``.
    """
    folder = Path(folder)
    cfg = run_config(folder)
    method = get_method(cfg.method.method)
    if not issubclass(method.kind, ZOKind):
        raise ValueError(f"{folder} is a {method.name} run: only ZO runs have a trajectory to replay")
    path = folder / rundir.TRAJECTORY
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the run has not saved its trajectory yet")
    header, trajectory = Trajectory.load(path)
    if model is None:
        m = cfg.model
        model, tokenizer = load_model(m.model, m.dtype, m.device, m.cache_dir)
    model = starting_model(model, cfg, method, folder)
    params = trainable_parameters(model)
    if (folder / rundir.INITIAL).is_file():  # the run's own starting prefix, not a recomputed one
        load_weights(params, load_checkpoint(folder / rundir.INITIAL)[0])
    steps = len(trajectory) if upto is None else min(upto, len(trajectory))
    replay(params, (header, trajectory), steps)
    trained = {name for group in header["groups"] for name in group["names"] or ()}
    if trained:  # the parameters the run trained (--zo-blocks trains a subset of the adapter's)
        params = [(name, p) for name, p in params if name in trained]
    return model, params, steps


def compare_with_checkpoint(params, checkpoint: str | Path) -> tuple[bool, float]:
    """``(bitwise equal, max |difference|)`` between ``params`` and a checkpoint's weights."""
    weights = load_checkpoint(checkpoint)[0]
    equal, worst = True, 0.0
    for name, p in params:
        w = weights[name].to(p.device)
        equal &= torch.equal(p.detach(), w)
        worst = max(worst, float((p.detach().double() - w.double()).abs().max()))
    return equal, worst
