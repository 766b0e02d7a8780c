"""Checkpoints of a distributed run: gathered to rank 0, written atomically, resumed with the same world size.

Between Local SGD synchronizations the ranks hold *different* weights, optimizer states and data-stream
positions, so a checkpoint stores every rank's state: rank 0 gathers them, writes
``{"format", "world_size", "states": [state of rank 0, rank 1, ...]}`` to a temporary file in the same folder
and renames it into place (a crash never leaves a half-written checkpoint), then all ranks pass a barrier.
Resuming reads the file on every rank and returns that rank's state; a different world size is refused,
because the per-rank states (and the data each rank would see) do not map onto another world size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from hdopt.distributed.comm import Communicator
from hdopt.io import atomic_path

FORMAT = "hdopt-distributed-checkpoint/1"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any], comm: Communicator) -> Path:
    """Collective: every rank passes its own ``state``; rank 0 writes all of them atomically to ``path``.

    Args:
        path: destination file (its folder is created).
        state: this rank's state — tensors, dicts, lists, numbers, strings (e.g. ``model.state_dict()``,
            ``local_sgd.state_dict()``, a data generator's ``get_state()``).
        comm: the communicator (one process: the file holds one state).

    Returns:
        The path (written once this returns on any rank).
    """
    path = Path(path)
    states = comm.gather_object(state, f"checkpoint gather for {path.name}")
    if comm.rank == 0:
        with atomic_path(path) as tmp:
            torch.save({"format": FORMAT, "world_size": comm.world_size, "states": states}, tmp)
    comm.barrier(f"checkpoint barrier for {path.name}")
    return path


def load_checkpoint(path: str | os.PathLike, comm: Communicator) -> dict[str, Any]:
    """This rank's state from a checkpoint written by :func:`save_checkpoint` with the same world size."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"{path} is not an hdopt distributed checkpoint (expected format {FORMAT})")
    if saved["world_size"] != comm.world_size:
        raise ValueError(f"{path} was written by {saved['world_size']} processes; resume it with the "
                         f"same number (torchrun --nproc_per_node {saved['world_size']}), "
                         f"not {comm.world_size}")
    return saved["states"][comm.rank]
