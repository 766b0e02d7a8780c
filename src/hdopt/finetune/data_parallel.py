"""Data-parallel forward-only training under torchrun: the pieces the trainer calls when WORLD_SIZE > 1.

What runs where (``torchrun --nproc_per_node N -m hdopt finetune --method mezo ...``):

* Every rank builds the same setup, holds the same weights, draws the same batch (a function of
  (seed, step)) and the same ZO directions (shared seed). :func:`check_data_parallel` refuses backprop
  methods and batches that do not split evenly; :func:`make_data_parallel` checks that every rank runs the
  same config from the same weights (``mezo-prefix`` takes rank 0's initial prefix) before the first step.
* Each rank evaluates the loss on its contiguous shard of every micro-batch (weighted by
  :func:`shard_weight` for the answer loss), so the mean over ranks is the whole micro-batch's loss.
* All-reduced per step, scalars only: the q projected gradients (and ``ZOConservative``'s 3 candidate
  losses) through the optimizer's ``reduce`` hook (:class:`hdopt.distributed.ScalarAllReduce`; a rank
  whose loss is not finite joins with NaN, so every rank stops alike); then the batch loss and the stop
  flag (:func:`agree`).
  Every rank applies the same update and logs, guards and stops on the same numbers. Evaluation (in the
  trainer) is sharded too: each rank scores 1/N of dev/test and the per-example records are gathered.
* Rank 0 alone writes the run folder (the trainer's ``Setup.writer``); :func:`process_group` creates and
  destroys the process group around a run. See docs/finetune.md.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from hdopt.distributed import (
    Communicator,
    ConfigMismatchError,
    RankFailureError,
    check_consistent,
    fingerprint,
    init_from_env,
    shard_range,
)
from hdopt.finetune.batches import encode, uses_answer_loss
from hdopt.finetune.config import ConfigError, RunConfig
from hdopt.finetune.methods import Method, MethodError, get_method, list_methods
from hdopt.finetune.optimizers import DivergenceError

if TYPE_CHECKING:
    from hdopt.finetune.trainer import Setup

AGREED_ERRORS = (ConfigError, ConfigMismatchError, DivergenceError, MethodError)  # raised on every rank alike


def launched_world() -> tuple[int, int]:
    """``(rank, world size)`` of this process: the process group's, else torchrun's variables, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


@contextlib.contextmanager
def process_group(cfg: RunConfig) -> Iterator[Communicator]:
    """The run's communicator, for the duration of the run.

    Under torchrun (WORLD_SIZE > 1) this creates the default process group (gloo for a CPU model, NCCL for
    ``--device cuda``, where each rank uses GPU ``LOCAL_RANK``) with a ``dist_timeout`` deadline, and at the
    end passes a barrier and destroys it. An error every rank raises alike (a refused config, divergence)
    still ends with the barrier; another error destroys the group at once (the peers then fail fast
    instead of waiting for the deadline); after a :class:`RankFailureError` the group is left alone (its
    threads may be stuck: the CLI exits at once). A group the caller created is used and left in place.
    """
    timeout = cfg.train.dist_timeout
    if dist.is_available() and dist.is_initialized():
        yield Communicator(timeout_s=timeout)
        return
    if launched_world()[1] <= 1:
        yield Communicator.single()
        return
    comm = init_from_env(timeout_s=timeout, backend="nccl" if cfg.model.device.startswith("cuda") else "gloo")
    try:
        yield comm
    except RankFailureError:
        raise
    except AGREED_ERRORS:
        _close_group(comm, barrier=True, strict=False)
        raise
    except BaseException:
        _close_group(comm, barrier=False, strict=False)
        raise
    _close_group(comm, barrier=True, strict=True)


def _close_group(comm: Communicator, barrier: bool, strict: bool) -> None:
    if barrier:
        try:
            comm.barrier("barrier at the end of the run")
        except RankFailureError:
            if strict:
                raise
            return  # a peer is gone: destroying the group could wait for it
    dist.destroy_process_group()


def check_data_parallel(cfg: RunConfig, method: Method, world_size: int) -> None:
    """Refuse what data-parallel training cannot do: backprop methods, a batch that does not split evenly."""
    if world_size <= 1:
        return
    if method.trainer != "zo":
        zo = ", ".join(m for m in list_methods() if get_method(m).trainer == "zo")
        how = "backprop" if method.trainer == "fo" else "a linear probe"
        raise ConfigError(
            f"method {method.name!r} trains with {how} and cannot run on {world_size} processes: "
            f"torchrun data parallelism covers the forward-only methods ({zo}). Run {method.name} in one "
            "process (`hdopt finetune ...` without torchrun), or wrap the model in "
            "torch.nn.parallel.DistributedDataParallel in a loop of your own"
        )
    if cfg.method.lp_init:
        raise ConfigError(
            f"--lp-init is not supported on {world_size} processes (each would fit the probe on all the "
            "data): run it in one process, or fit the probe once with `hdopt finetune --method lp` and start "
            "the torchrun job from a model whose head holds it"
        )
    t = cfg.train
    unit = world_size * t.grad_accum
    if t.batch_size % unit:
        accum = f" with grad_accum {t.grad_accum} (micro-batches of {t.batch_size // t.grad_accum})"
        raise ConfigError(
            f"batch_size {t.batch_size}{accum if t.grad_accum > 1 else ''} cannot be split evenly over "
            f"{world_size} processes: every process must get the same number of examples of each "
            f"micro-batch. Use a batch size divisible by {unit} (e.g. --batch-size "
            f"{-(-t.batch_size // unit) * unit}) or another --nproc_per_node"
        )


def make_data_parallel(optimizer, model: torch.nn.Module, params, cfg: RunConfig, method: Method,
                       comm: Communicator) -> None:  # fmt: skip
    """Check that every rank runs the same config and optimizer from the same weights (the optimizer was
    built with the all-reduce hook)."""
    if method.adapter == "prefix":  # its activation init depends on float op order (threads): rank 0's wins
        for name, p in params:
            comm.broadcast_(p.data, 0, f"broadcast of the initial prefix {name}")
    check_consistent(fingerprint(cfg, model, optimizer), comm, "data-parallel ZO")


def shard_weight(s: Setup, examples: Sequence) -> float:
    """Factor that makes the mean over ranks of the shard losses equal the whole micro-batch's loss.

    1 for losses averaged over examples (equal shards). The answer loss averages over answer tokens, so a
    shard's loss is weighted by ``world * its tokens / the micro-batch's tokens``.
    """
    if s.cfg.method.objective != "loss" or not uses_answer_loss(s.task):
        return 1.0
    n, world = len(examples), s.comm.world_size
    tokens = [
        encode(s.task, s.tokenizer, examples[shard_range(n, r, world)], s.cfg.data.max_length, "cpu")
        .target_token.numel()
        for r in range(world)
    ]
    return world * tokens[s.comm.rank] / sum(tokens)


def agree(comm: Communicator, loss: float, stop: bool, step: int) -> tuple[float, bool]:
    """``(mean loss over ranks, any rank asked to stop)``: one all-reduce of two float64."""
    t = torch.tensor([loss, float(stop)], dtype=torch.float64, device=comm.device)
    comm.all_reduce_sum_(t, f"loss and stop-flag all-reduce at step {step}")
    return float(t[0]) / comm.world_size, bool(t[1] > 0)


def world_size_message(folder: Path, saved: int, world: int) -> str:
    """Why a run cannot resume with another number of processes, and the command that can."""
    how = (f"torchrun --nproc_per_node {saved} -m hdopt finetune --resume {folder}" if saved > 1
           else f"hdopt finetune --resume {folder} (one process, without torchrun)")  # fmt: skip
    return (f"{folder} was trained by {saved} process{'es' if saved > 1 else ''} and this is {world}: "
            f"resume it with the same number, {how}")
