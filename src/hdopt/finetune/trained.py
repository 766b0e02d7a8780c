"""Rebuild the model a fine-tuning run tested, from its run folder and its starting model.

A run folder keeps only what the starting model lacks: the trainable weights (full weights, LoRA adapters,
the prefix, or the LM head of head tuning) for backprop runs and ``keep_weights`` ZO runs, or, by default
for ZO runs, the trajectory alone (a few bytes a step), from which the weights of any step are rebuilt by
replay. :func:`load_trained` attaches the run's adapter to the starting model, as the run did, checks that it
is the run's starting model (the sha256 the run recorded) and brings it to the weights the test evaluated:
those with the best dev metric when the run kept the best (``best.safetensors``, or a replay to the best
step), else the last checkpoint's. A rebuilt model is checked against the digest the run recorded of those
weights, so it is bitwise the tested one or an error says why not.

    >>> model, tokenizer = load_trained("runs/finetune-copa-lp-...")  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hdopt.finetune import rundir
from hdopt.finetune.adapters import prepare_model, trainable_parameters
from hdopt.finetune.checkpoint import load_checkpoint, load_weights, model_digest, tensors_digest
from hdopt.finetune.config import RunConfig
from hdopt.finetune.errors import RunFolderError
from hdopt.finetune.label_head import apply_label_head, load_label_head
from hdopt.finetune.methods import Method, get_method
from hdopt.lm.models import load_model
from hdopt.lm.tasks import resolve_task
from hdopt.zo import replay


def run_config(folder: str | Path) -> RunConfig:
    """The resolved config a run saved (``config.json``, without its method record)."""
    return rundir.read_config(Path(folder))[0]


def run_method(cfg: RunConfig) -> Method:
    """The method that ran for ``cfg`` (``lp`` on a task without label words: head tuning)."""
    task = resolve_task(cfg.data.task, allow_outside=cfg.data.allow_outside_data or None)
    return get_method(cfg.method.method).for_task(task)


@dataclass
class RunRecord:
    """What a run's last checkpoint says about its weights (empty for a folder without one)."""

    step: int | None = None
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # empty: rebuilt from the trajectory
    weights_sha256: str | None = None
    loop: dict[str, Any] = field(default_factory=dict)  # best_step, best_sha256, start_sha256, ...

    @classmethod
    def of(cls, folder: Path) -> RunRecord:
        path = folder / rundir.CHECKPOINT
        if not path.is_file():
            return cls()
        weights, training, meta = load_checkpoint(path)
        loop = (training or {}).get("loop", {})
        return cls(meta.get("step"), weights, meta.get("weights_sha256"), loop)


def check_start(model: nn.Module, start_sha256: str | None, folder: str | Path) -> None:
    """Refuse to continue or rebuild a run from another starting model than the one it was trained from."""
    if start_sha256 is not None and model_digest(model) != start_sha256:
        raise RunFolderError(
            f"this is not the starting model of {folder} (its weights' sha256 differs from the run's): load "
            "the model and dtype the run's config.json names, unchanged"
        )


def starting_model(model: nn.Module, cfg: RunConfig, method: Method, folder: str | Path) -> nn.Module:
    """The model a run started training from: its adapter attached as the trainer attached it (same seed),
    for ``--lp-init`` runs the saved linear-probe rows written into the LM head, and for adapters whose
    start the model computes (the prefix) the run's saved start."""
    folder = Path(folder)
    torch.manual_seed(cfg.train.seed)  # as the trainer's setup does before attaching the adapter
    model = prepare_model(model, method.adapter, cfg.method, cfg.train.seed)
    if cfg.method.lp_init:
        apply_label_head(model, load_label_head(folder / rundir.LP_HEAD))
    if (folder / rundir.INITIAL).is_file():
        load_weights(trainable_parameters(model), load_checkpoint(folder / rundir.INITIAL)[0])
    return model


def trained_subset(folder: Path, cfg: RunConfig, params: list[tuple[str, torch.Tensor]]
                   ) -> list[tuple[str, torch.Tensor]]:  # fmt: skip
    """The parameters the run trained: with ``--zo-blocks``, those of the top blocks its trajectory names
    (the checkpoints and digests hold those), else ``params``."""
    if cfg.method.zo_blocks is None:
        return params
    header, _ = rundir.load_trajectory(Path(folder) / rundir.TRAJECTORY)
    names = {name for group in header["groups"] for name in group["names"] or ()}
    return [(name, p) for name, p in params if name in names] if names else params


def run_start(folder: Path, cfg: RunConfig, method: Method, model: nn.Module | None = None, tokenizer=None):
    """``(record, model, tokenizer, params)``: the run's last checkpoint record, its starting model (loaded as
    the run did when ``model`` is None) checked against the sha256 the run recorded, and the parameters it
    trained, as they start."""
    record = RunRecord.of(folder)
    if model is None:
        cfg.model.check_available()
        model, tokenizer = load_model(cfg.model.model, cfg.model.dtype, cfg.model.device, cfg.model.cache_dir)
    model = starting_model(model, cfg, method, folder)
    check_start(model, record.loop.get("start_sha256"), folder)
    return record, model, tokenizer, trained_subset(folder, cfg, trainable_parameters(model))


def replay_to(folder: Path, params, steps: int | None, record: RunRecord) -> int:
    """Replay the run's trajectory.bin (checked) from the starting ``params`` to ``steps`` (default: all of
    it, which must reach the checkpoint's step); returns the number of steps replayed."""
    header, trajectory = rundir.load_trajectory(folder / rundir.TRAJECTORY)
    if record.step is not None and len(trajectory) < record.step:
        raise RunFolderError(
            f"{folder / rundir.TRAJECTORY} holds {len(trajectory)} steps but the run's checkpoint is at step "
            f"{record.step}: the trajectory is damaged (truncated)"
        )
    steps = len(trajectory) if steps is None else steps
    if steps > len(trajectory):
        raise RunFolderError(f"{folder / rundir.TRAJECTORY} holds {len(trajectory)} steps, not {steps}")
    replay(params, (header, trajectory), steps)
    return steps


def load_trained(folder: str | Path, model: nn.Module | None = None,
                 tokenizer=None) -> tuple[nn.Module, object]:  # fmt: skip
    """``(model, tokenizer)``: the run's starting model with its adapter and its selected trained weights.

    Args:
        folder: a finished (or checkpointed) run folder of a ``zo`` or ``fo`` method.
        model, tokenizer: the starting model, if already loaded (else loaded as the run did). It is
            modified: adapters are attached (LoRA, prefix), a tied LM head is untied (head tuning,
            ``--lp-init``).

    Raises:
        ValueError: for the logistic-regression ``lp`` (its best.safetensors holds the probe, not model
            weights); :class:`RunFolderError` for another starting model or a damaged or stale file.
    """
    folder = Path(folder)
    cfg = run_config(folder)
    method = run_method(cfg)
    if not method.kind.takes_steps:
        raise ValueError(
            f"{folder} is a logistic-regression probe: its {rundir.BEST} holds the probe's coefficients, "
            "not weights of the model"
        )
    record, model, tokenizer, params = run_start(folder, cfg, method, model, tokenizer)
    best = record.loop.get("best_step") if cfg.train.keep_best else None
    if record.weights or record.step is None:  # weights kept (backprop, keep_weights), or an older folder
        load_weights(params, _kept_weights(folder, cfg, best))
    else:  # seeds only: replay to the best step (or the last) and check the digest the run recorded
        steps = record.step if best is None else best
        replay_to(folder, params, steps, record)
        expected = record.weights_sha256 if best is None else record.loop.get("best_sha256")
        if expected is not None and tensors_digest(params) != expected:
            raise RunFolderError(f"the weights rebuilt from {folder / rundir.TRAJECTORY} to step {steps} are "
                                 "not the run's (sha256): other library versions or hardware?")  # fmt: skip
    model.eval()
    return model, tokenizer


def _kept_weights(folder: Path, cfg: RunConfig, best_step: int | None) -> dict[str, torch.Tensor]:
    """best.safetensors when the run kept the best (it must hold the best step), else the checkpoint's."""
    path, checkpoint = folder / rundir.BEST, folder / rundir.CHECKPOINT
    if cfg.train.keep_best and (path.is_file() or best_step is not None):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the best weights (step {best_step}) are missing")
        weights, _, meta = load_checkpoint(path)
        if best_step is not None and meta.get("step") != best_step:
            raise RunFolderError(f"{path} holds step {meta.get('step')}, not the run's best step "
                                 f"{best_step}: it is stale")  # fmt: skip
        return weights
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{folder} holds no {rundir.BEST} or {rundir.CHECKPOINT}: has it saved yet?")
    return load_checkpoint(checkpoint)[0]
