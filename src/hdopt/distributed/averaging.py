"""Averaging tensors over replicas: K replicas in this process times N processes.

``average_(per_replica)`` sets every tensor to ``(1 / (K N)) sum_{k, n} x_{k, n}``: the K local copies are
summed here, the sums are all-reduced over the N processes, and the mean is written back to every local copy.
With K = 1 this is ordinary data-parallel averaging; with N = 1 it is the simulated mode; both give the same
numbers. Tensors are flattened into one buffer per dtype so each call is one collective per dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hdopt.distributed.comm import Communicator


def payload_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes one worker hands to all-reduce for ``tensors``."""
    return sum(t.numel() * t.element_size() for t in tensors)


class ReplicaAverager:
    """Mean over local replicas and processes, in place.

    Args:
        comm: the communicator over processes (a single-process one in the simulated mode).
    """

    def __init__(self, comm: Communicator):
        self.comm = comm

    @torch.no_grad()
    def average_(self, per_replica: Sequence[Sequence[torch.Tensor]], what: str) -> int:
        """Replace ``per_replica[k][i]`` by the mean over all replicas of tensor ``i``.

        Args:
            per_replica: for each local replica, the same list of tensors (same shapes and dtypes).
            what: names the collective in error messages.

        Returns:
            The payload in bytes one worker communicates (what a process would all-reduce; counted in the
            simulated mode too, so both modes report the same numbers).
        """
        count = len(per_replica) * self.comm.world_size
        first = per_replica[0]
        assert all(len(r) == len(first) for r in per_replica), "replicas hold different tensor lists"
        buckets: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for i, t in enumerate(first):
            buckets.setdefault((t.dtype, t.device), []).append(i)
        for (dtype, _), idx in buckets.items():
            flat = torch.cat([first[i].reshape(-1) for i in idx])
            for replica in per_replica[1:]:
                flat.add_(torch.cat([replica[i].reshape(-1) for i in idx]))
            self.comm.all_reduce_sum_(flat, f"{what} ({dtype})")
            if dtype.is_floating_point or dtype.is_complex:
                flat.div_(count)
            else:
                flat.div_(count, rounding_mode="floor")
            for replica in per_replica:
                for i, piece in zip(idx, flat.split([replica[i].numel() for i in idx]), strict=True):
                    replica[i].copy_(piece.view_as(replica[i]))
        return payload_bytes(first)
