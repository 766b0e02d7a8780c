"""Collectives on torch.distributed with a deadline, a culprit in every failure message, and a byte counter.

A :class:`Communicator` wraps one process group (gloo on CPU, NCCL on GPU). Every all-reduce

1. writes a heartbeat ``seq`` (the collective's sequence number on this rank) to the rendezvous store,
2. runs ``torch.distributed.all_reduce`` asynchronously and waits at most ``timeout_s``,
3. on failure (a peer closed its sockets, or the deadline passed) reads every rank's heartbeat and raises
   :class:`RankFailureError` naming the ranks that never joined the collective.

The process group's own timeout must equal the communicator's (:func:`init_from_env` does this): gloo only
frees its worker threads when its timeout fires, and until then the interpreter cannot exit.

Without torch.distributed (or with a world of one) a communicator is a no-op: the same training code runs in
one process, which is how the simulated Local SGD mode and single-GPU runs use it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 120.0
_HEARTBEAT = "hdopt/heartbeat/"


class RankFailureError(RuntimeError):
    """A peer rank died or hangs: a collective failed or passed its deadline. The message names the rank."""


class ConfigMismatchError(ValueError):
    """Ranks were started with different configurations (seeds, model sizes, hyperparameters)."""


@dataclass
class CommStats:
    """Collectives run by this rank and their payload (bytes handed to all-reduce, i.e. per worker)."""

    calls: int = 0
    bytes: int = 0


class Communicator:
    """All-reduce and object exchange over a process group, with a deadline and failure diagnosis.

    Args:
        group: the process group (None: the default group when torch.distributed is initialized; otherwise
            a single-process communicator whose collectives are no-ops).
        timeout_s: deadline of every collective, in seconds.
        heartbeat: write the per-rank sequence number to the rendezvous store before each collective, so a
            failure can name the rank that is missing (one small store write per collective).
    """

    def __init__(self, group: Any = None, timeout_s: float = DEFAULT_TIMEOUT_S, heartbeat: bool = True):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.distributed = dist.is_available() and dist.is_initialized()
        self.group = group
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.world_size = dist.get_world_size(group) if self.distributed else 1
        self.timeout_s = float(timeout_s)
        self.store = _default_store() if (self.distributed and heartbeat) else None
        self.stats = CommStats()
        self._seq = 0

    @classmethod
    def single(cls) -> Communicator:
        """A communicator for one process (even when torch.distributed is initialized)."""
        comm = cls.__new__(cls)
        comm.distributed, comm.group, comm.rank, comm.world_size = False, None, 0, 1
        comm.timeout_s, comm.store, comm.stats, comm._seq = DEFAULT_TIMEOUT_S, None, CommStats(), 0
        return comm

    @property
    def active(self) -> bool:
        """True when collectives really communicate (world size > 1)."""
        return self.distributed and self.world_size > 1

    # -- collectives --------------------------------------------------------------------------------
    def all_reduce_sum_(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place; ``what`` names the collective in error messages."""
        if not self.active:
            return tensor
        self.stats.calls += 1
        self.stats.bytes += tensor.numel() * tensor.element_size()
        self._guarded(what, lambda: dist.all_reduce(tensor, group=self.group, async_op=True))
        return tensor

    def mean(self, value: float, what: str = "mean of a scalar") -> float:
        """The mean of a Python float over ranks (e.g. the loss, for logging)."""
        if not self.active:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        return float(self.all_reduce_sum_(t, what).item()) / self.world_size

    def broadcast_(self, tensor: torch.Tensor, src: int, what: str) -> torch.Tensor:
        """Overwrite ``tensor`` with rank ``src``'s value."""
        if not self.active:
            return tensor
        self.stats.calls += 1
        self.stats.bytes += tensor.numel() * tensor.element_size()
        self._guarded(what, lambda: dist.broadcast(tensor, src, group=self.group, async_op=True))
        return tensor

    def all_gather_object(self, obj: Any, what: str) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        self._guarded(what, lambda: dist.all_gather_object(out, obj, group=self.group))
        return out

    def gather_object(self, obj: Any, what: str, dst: int = 0) -> list[Any] | None:
        """Every rank's ``obj`` on rank ``dst`` (None elsewhere)."""
        if not self.active:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.rank == dst else None
        self._guarded(what, lambda: dist.gather_object(obj, out, dst=dst, group=self.group))
        return out

    def barrier(self, what: str = "barrier") -> None:
        """Wait for every rank (as an all-reduce of one byte, so it shares the deadline and diagnosis)."""
        if self.active:
            self.all_reduce_sum_(torch.zeros(1, dtype=torch.uint8, device=self.device), what)

    # -- deadline and diagnosis ---------------------------------------------------------------------
    def _guarded(self, what: str, launch) -> None:
        self._seq += 1
        self._beat()
        try:
            work = launch()
            if work is not None:  # async collectives return a Work handle
                work.wait(datetime.timedelta(seconds=self.timeout_s))
        except RankFailureError:
            raise
        except Exception as err:  # noqa: BLE001 - gloo/NCCL raise RuntimeError or DistBackendError
            raise RankFailureError(self.diagnose(what, err)) from err

    def _beat(self) -> None:
        if self.store is None:
            return
        try:
            self.store.set(f"{_HEARTBEAT}{self.rank}", str(self._seq))
        except Exception:  # noqa: BLE001 - a dead store is reported by the collective itself
            self.store = None

    def heartbeats(self) -> dict[int, int | None]:
        """The last collective each rank joined (None: never). A store that cannot be read raises (its host,
        rank 0 or the launcher, died): "never joined" would blame every rank."""
        seen: dict[int, int | None] = {}
        for r in range(self.world_size):
            key = f"{_HEARTBEAT}{r}"
            seen[r] = int(self.store.get(key)) if self.store.check([key]) else None
        return seen

    def diagnose(self, what: str, err: BaseException) -> str:
        """The error message for a failed collective: which ranks did not join it."""
        head = (f"{what}: collective #{self._seq} failed on rank {self.rank} of {self.world_size} "
                f"(deadline {self.timeout_s:g} s)")
        cause = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        if self.store is None:
            return f"{head}; a peer rank died or hangs (no rendezvous store to tell which). Cause: {cause}"
        try:
            seen = self.heartbeats()
        except Exception:  # noqa: BLE001
            return f"{head}; the rendezvous store is unreachable: rank 0 or the launcher died. Cause: {cause}"
        late = {r: s for r, s in seen.items() if r != self.rank and (s is None or s < self._seq)}
        if not late:
            others = [r for r in range(self.world_size) if r != self.rank]
            who = f"rank {others[0]}" if len(others) == 1 else "a rank"
            return (f"{head}; every rank had joined it, so {who} died during it "
                    f"(check the other ranks' logs). Cause: {cause}")
        names = ", ".join(
            f"rank {r} ({'never joined a collective' if s is None else f'last joined #{s}'})"
            for r, s in sorted(late.items()))
        return f"{head}: {names} did not join it: it died or hangs. Cause: {cause}"

    @property
    def device(self) -> torch.device:
        """Where this backend's tensors must live: the current CUDA device for NCCL, else the CPU."""
        if self.distributed and dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def _default_store() -> Any:
    """The default group's rendezvous store (torch keeps it private), or None if unavailable."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001
        return None


def init_from_env(timeout_s: float = DEFAULT_TIMEOUT_S, backend: str | None = None) -> Communicator:
    """Initialize torch.distributed from the launcher's environment and return a :class:`Communicator`.

    Under ``torchrun`` (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set) the default process group is created
    with ``backend`` (default: NCCL when CUDA is available, else gloo) and the same ``timeout_s`` as the
    communicator; with NCCL, the device is ``LOCAL_RANK``. Without those variables this is a single-process
    run: nothing is initialized and the communicator's collectives are no-ops.

    Args:
        timeout_s: deadline for every collective (and for the process group itself).
        backend: "gloo" or "nccl" (None: choose as above).

    Returns:
        The communicator for the default group.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Communicator.single()
    if not dist.is_initialized():
        _import_group_capturing_modules()
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Communicator(timeout_s=timeout_s)


def _import_group_capturing_modules() -> None:
    """Import, before the default group exists, the torch modules that capture it at import time.

    ``torch.distributed.nn.functional`` binds ``group.WORLD`` as a default argument when it is imported;
    transformers imports it (through ``torch.distributed._shard``) when a model class is first loaded. If
    that happens after ``init_process_group``, the default group stays referenced after
    ``destroy_process_group``: its gloo threads live on and are torn down during interpreter shutdown,
    which now and then ends the process with ``terminate called without an active exception`` (SIGABRT)
    after a run that succeeded. Imported first, the default argument is None (the default group at call
    time) and destroying the group frees it.
    """
    import torch.distributed.nn  # noqa: F401


@contextlib.contextmanager
def exit_on_rank_failure(code: int = 1) -> Iterator[None]:
    """Turn a :class:`RankFailureError` into an immediate process exit with ``code`` after printing it.

    For launch scripts and CLIs: a clean interpreter shutdown can wait on the collective a dead or hung peer
    never joins (the backend's threads stay blocked), so the error is printed and the process leaves with
    ``os._exit``; the launcher (torchrun) then tears the job down.
    """
    try:
        yield
    except RankFailureError as err:
        print(f"hdopt.distributed: {err}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(code)
