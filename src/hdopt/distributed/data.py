"""Splitting work across ranks: contiguous batch shards (data-parallel), per-worker seeds (Local SGD).

Data-parallel ZO and DDP-style steps need every rank to see a *different part of the same global batch*: draw
the global batch with the shared seed on every rank, then keep ``shard_batch(batch, rank, world_size)``.
Local SGD workers instead sample their own batches: seed each worker's generator with
``worker_seed(seed, worker)``, where ``worker`` is the global replica index (the rank in process mode, the
replica index in the simulated mode), so both modes see identical data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from hdopt.zo.noise import derive_key


def shard_range(n: int, rank: int, world_size: int) -> slice:
    """The contiguous slice of ``n`` items that ``rank`` keeps; ``n`` must divide evenly.

    Equal shards are what make the mean of the shard losses equal the global batch loss.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of size {world_size}")
    if n % world_size:
        raise ValueError(f"a batch of {n} cannot be split evenly over {world_size} ranks: use a global batch "
                         f"size divisible by the number of processes")
    size = n // world_size
    return slice(rank * size, (rank + 1) * size)


def shard_batch(batch: Any, rank: int, world_size: int) -> Any:
    """This rank's part of a global batch: tensors (split on dim 0), and dicts/tuples/lists of them.

    Non-tensor leaves (e.g. strings, ints) are kept whole. Every tensor must have the same first dimension.
    """
    sizes = {t.shape[0] for t in _tensors(batch)}
    if len(sizes) > 1:
        raise ValueError(f"batch tensors have different first dimensions {sorted(sizes)}; cannot shard")
    if not sizes:
        return batch
    sl = shard_range(sizes.pop(), rank, world_size)
    return _map(batch, lambda t: t[sl])


def worker_seed(seed: int, worker: int) -> int:
    """A 63-bit seed for worker ``worker``'s data stream, derived from the run's ``seed``."""
    return derive_key(seed, 0x10CA1, worker) & ((1 << 63) - 1)


def _tensors(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for v in batch.values() for t in _tensors(v)]
    if isinstance(batch, (tuple, list)):
        return [t for v in batch for t in _tensors(v)]
    return []


def _map(batch: Any, fn) -> Any:
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return type(batch)({k: _map(v, fn) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_map(v, fn) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_map(v, fn) for v in batch)
    return batch
