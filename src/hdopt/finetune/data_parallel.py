"""Data-parallel forward-only training under torchrun: a wrapper around the pieces of the trainer's loop.

The loop (:mod:`hdopt.finetune.trainer`) asks a ``workers`` object for each piece that depends on the number
of processes: :class:`OneProcess` passes every piece through; :class:`DataParallel` (``torchrun
--nproc_per_node N -m hdopt finetune --method mezo ...``) wraps them:

* Every rank builds the same setup, holds the same weights, draws the same batch (a function of
  (seed, step)) and the same ZO directions (shared seed). :func:`check_data_parallel` refuses kinds that
  cannot run data-parallel (backprop, the probe) and batches that do not split evenly;
  :func:`make_data_parallel` checks that every rank runs the same config from the same weights
  (``mezo-prefix`` takes rank 0's initial prefix) before the first step.
* Each rank evaluates the loss on its contiguous shard of every micro-batch (weighted by
  :func:`shard_weight` for the answer loss), so the mean over ranks is the whole micro-batch's loss.
* All-reduced per step, scalars only: the q projected gradients (and ``ZOConservative``'s 3 candidate
  losses) through the optimizer's ``reduce`` hook (:class:`hdopt.distributed.ScalarAllReduce`; a rank
  whose loss is not finite joins with NaN, so every rank stops alike); then the batch loss and the stop
  flag (:func:`agree`). Every rank applies the same update and logs, guards and stops on the same numbers.
* Evaluation is sharded too: each rank scores 1/N of dev/test and the per-example records are gathered.
* Rank 0 alone writes the run folder (``Setup.writer``); :func:`process_group` creates and destroys the
  process group around a run. See docs/finetune.md.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from hdopt.distributed import (
    Communicator,
    ConfigMismatchError,
    RankFailureError,
    ScalarAllReduce,
    check_consistent,
    fingerprint,
    init_from_env,
    shard_range,
)
from hdopt.finetune.adapters import ADAPTERS
from hdopt.finetune.batches import encode, uses_answer_loss
from hdopt.finetune.config import RunConfig
from hdopt.finetune.errors import ConfigError, DivergenceError, RunFolderError
from hdopt.finetune.methods import Method, MethodError, get_method, list_methods

if TYPE_CHECKING:
    from hdopt.finetune.trainer import Setup

AGREED_ERRORS = (ConfigError, ConfigMismatchError, DivergenceError, MethodError, RunFolderError,
                 FileExistsError)  # raised on every rank alike  # fmt: skip


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
    if not method.kind.data_parallel:
        covered = ", ".join(m for m in list_methods() if get_method(m).kind.data_parallel)
        raise ConfigError(
            f"method {method.name!r} trains with {method.kind.how} and cannot run on {world_size} processes: "
            f"torchrun data parallelism covers the forward-only methods ({covered}). Run {method.name} in "
            "one process (`hdopt finetune ...` without torchrun), or wrap the model in "
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
    if ADAPTERS.get(method.adapter).computed_start:  # depends on float op order (threads): rank 0's wins
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


def metrics_of(task, records: list[dict]) -> dict[str, float]:
    """The metrics of hdopt.lm.evaluation (percent, 2 decimals) from its per-example records."""

    def percent(key: str) -> float:
        return round(100.0 * sum(r[key] for r in records) / len(records), 2)

    if task.is_generation:
        return {"f1": percent("f1"), "em": percent("em")}
    return {"accuracy": percent("correct")}


class OneProcess:
    """The loop's pieces in one process: each passes through (:class:`DataParallel` wraps them)."""

    def __init__(self, comm: Communicator | None = None) -> None:
        self.comm = comm if comm is not None else Communicator.single()

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    def check(self, cfg: RunConfig, method: Method) -> None:
        """Refuse what this many processes cannot train (nothing, for one)."""

    def reduce_hook(self):
        """The ZO optimizer's ``reduce`` hook (None: one worker)."""
        return None

    def start(self, s: Setup) -> None:
        """Called once the run's kind and optimizer exist, before the first step."""

    def closure(self, s: Setup, examples: Sequence) -> Callable[[], torch.Tensor]:
        """The objective on a micro-batch: the kind's closure."""
        return s.kind.closure(examples)

    def evaluate(self, s: Setup, examples: Sequence, evaluate: Callable) -> dict[str, float]:
        """``evaluate(examples).metrics`` (an hdopt.lm evaluation of the current weights)."""
        return evaluate(examples).metrics

    def agree(self, loss: float, stop: bool, step: int) -> tuple[float, bool]:
        """The loss to log and guard, and whether to stop: this process's."""
        return loss, stop

    def barrier(self, what: str) -> None:
        """Wait for the other processes (none)."""

    def raise_for(self, failure: Exception | None, what: str) -> None:
        """Raise rank 0's ``failure`` (a user error of something only rank 0 does) on every rank."""
        if failure is not None:
            raise failure

    def run_folder(self, folder: Path) -> Path:
        """The run folder every process uses (a default name holds a timestamp)."""
        return folder

    def record(self) -> dict:
        """What results.json and the method record say about the processes (nothing for one)."""
        return {}


class DataParallel(OneProcess):
    """The pieces for ``world_size`` processes: sharded closures and evaluation, all-reduced scalars."""

    def check(self, cfg: RunConfig, method: Method) -> None:
        check_data_parallel(cfg, method, self.world_size)

    def reduce_hook(self):
        return ScalarAllReduce(self.comm)

    def start(self, s: Setup) -> None:
        make_data_parallel(s.optimizer, s.model, s.params, s.cfg, s.method, self.comm)

    def closure(self, s: Setup, examples: Sequence) -> Callable[[], torch.Tensor]:
        """The kind's closure on this rank's shard, weighted so that the mean over ranks is the batch's."""
        weight = shard_weight(s, examples)
        closure = s.kind.closure(examples[shard_range(len(examples), self.rank, self.world_size)])
        return closure if weight == 1.0 else (lambda: closure() * weight)

    def evaluate(self, s: Setup, examples: Sequence, evaluate: Callable) -> dict[str, float]:
        """Every rank evaluates a contiguous share; the per-example records are gathered and the metrics
        computed from all of them, as one process computes them."""
        n, world, rank = len(examples), self.world_size, self.rank
        mine = examples[rank * n // world : (rank + 1) * n // world]
        records = evaluate(mine).predictions if mine else []
        parts = self.comm.all_gather_object(records, f"gather of the evaluation of {n} examples")
        return metrics_of(s.task, [r for part in parts for r in part])

    def agree(self, loss: float, stop: bool, step: int) -> tuple[float, bool]:
        """Every rank logs, guards and stops on the same numbers: the mean loss, any rank's stop."""
        return agree(self.comm, loss, stop, step)

    def barrier(self, what: str) -> None:
        self.comm.barrier(what)

    def raise_for(self, failure: Exception | None, what: str) -> None:
        sent = (type(failure).__name__, str(failure)) if failure is not None else None
        kind_message = self.comm.all_gather_object(sent, what)[0]
        if failure is not None:
            raise failure
        if kind_message is not None:
            kind, message = kind_message
            raise (FileExistsError if kind == "FileExistsError" else RunFolderError)(message)

    def run_folder(self, folder: Path) -> Path:
        return Path(self.comm.all_gather_object(str(folder), "agreement on the run folder")[0])

    def record(self) -> dict:
        """The number of processes and this rank's all-reduce/broadcast payload so far (this session)."""
        return {"world_size": self.world_size, "communicated_bytes": self.comm.stats.bytes}


def workers_for(comm: Communicator) -> OneProcess:
    """:class:`DataParallel` over ``comm``'s ranks when there are several, else :class:`OneProcess`."""
    return DataParallel(comm) if comm.active else OneProcess(comm)
