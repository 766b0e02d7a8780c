"""Rebuild the model a fine-tuning run tested, from its run folder and its starting model.

A run folder keeps only the trainable weights (full weights, LoRA adapters, the prefix, or the LM head of
head tuning). :func:`load_trained` attaches the run's adapter to the starting model, as the run did, and
loads the weights the test evaluated: ``best.safetensors`` when the run kept the best dev checkpoint,
else the last ``checkpoint.safetensors``.

    >>> model, tokenizer = load_trained("runs/finetune-copa-lp-...")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from hdopt.finetune import rundir
from hdopt.finetune.adapters import prepare_model, trainable_parameters
from hdopt.finetune.checkpoint import load_checkpoint, load_weights
from hdopt.finetune.config import RunConfig
from hdopt.finetune.label_head import apply_label_head, load_label_head
from hdopt.finetune.methods import Method, get_method
from hdopt.lm.models import load_model
from hdopt.lm.tasks import resolve_task


def run_config(folder: str | Path) -> RunConfig:
    """The resolved config a run saved (``config.json``, without its method record)."""
    return rundir.read_config(Path(folder))[0]


def run_method(cfg: RunConfig) -> Method:
    """The method that ran for ``cfg`` (``lp`` on a task without label words: head tuning)."""
    return get_method(cfg.method.method).for_task(resolve_task(cfg.data.task))


def selected_checkpoint(folder: str | Path, cfg: RunConfig) -> Path:
    """The weights a run's test evaluated: best.safetensors (kept best dev), else the last checkpoint."""
    folder = Path(folder)
    if cfg.train.keep_best and (folder / rundir.BEST).is_file():
        return folder / rundir.BEST
    if (folder / rundir.CHECKPOINT).is_file():
        return folder / rundir.CHECKPOINT
    raise FileNotFoundError(f"{folder} holds no {rundir.BEST} or {rundir.CHECKPOINT}: has the run saved yet?")


def starting_model(model: nn.Module, cfg: RunConfig, method: Method, folder: str | Path) -> nn.Module:
    """The model a run started training from: its adapter attached as the trainer attached it (same
    seed) and, for ``--lp-init`` runs, the saved linear-probe rows written into the LM head."""
    torch.manual_seed(cfg.train.seed)  # as the trainer's setup does before attaching the adapter
    model = prepare_model(model, method.adapter, cfg.method, cfg.train.seed)
    if cfg.method.lp_init:
        apply_label_head(model, load_label_head(Path(folder) / rundir.LP_HEAD))
    return model


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
            weights).
    """
    folder = Path(folder)
    cfg = run_config(folder)
    method = run_method(cfg)
    if not method.kind.takes_steps:
        raise ValueError(
            f"{folder} is a logistic-regression probe: its {rundir.BEST} holds the probe's coefficients, "
            "not weights of the model"
        )
    path = selected_checkpoint(folder, cfg)
    if model is None:
        m = cfg.model
        model, tokenizer = load_model(m.model, m.dtype, m.device, m.cache_dir)
    model = starting_model(model, cfg, method, folder)
    load_weights(trainable_parameters(model), load_checkpoint(path)[0])
    model.eval()
    return model, tokenizer
