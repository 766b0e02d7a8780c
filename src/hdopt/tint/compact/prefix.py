"""Prefix rows of the compact TinT: the auxiliary's linear maps packed several weight rows per prefix token.

A linear map ``y = W x + b`` with W (d_out, d_in) is a *group* of K = ceil(d_out / S) prefix rows; row j
holds the S weight rows ``j, K + j, ..., (S - 1) K + j``, each followed by its bias (slot s =
``[w_{sK+j}, b_{sK+j}]``, d_in + 1 coordinates), and the one-hot ``e_j`` of its index in the group.
Coordinates of a prefix row::

    [ e (K_max) | slot 0 (d_in + 1) | slot 1 | ... | slot S-1 ]

Heads of the linear-attention modules each read one slot (a slice of the row), and output coordinate
``s K + j`` of head s is weight row ``s K + j``: the outputs of the S heads are already in order, so the fixed
permutation that reassembles them is the identity on contiguous blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Group:
    """One packed linear map: prefix rows ``start .. start + rows``."""

    name: str  # "<layer>.<map>" (e.g. "3.fc1") or "lnf"
    kind: str  # the map's kind: groups of one kind share shapes and modules
    start: int
    rows: int  # K
    slots: int  # S, weight rows per prefix token
    d_in: int
    d_out: int


def slots_for(d_in: int, slot_budget: int) -> int:
    """Weight rows per prefix token for a map with ``d_in`` inputs: as many as fit ``slot_budget`` coords."""
    return max(1, slot_budget // (d_in + 1))


class PrefixLayout:
    """Where every packed linear map lives: groups of prefix rows and the coordinates inside a row."""

    def __init__(self, maps: list[tuple[str, str, int, int]], slot_budget: int):
        """``maps``: (name, kind, d_in, d_out) in prefix order; ``slot_budget``: coordinates for the slots."""
        self.groups: dict[str, Group] = {}
        rows = 0
        for name, kind, d_in, d_out in maps:
            S = slots_for(d_in, slot_budget)
            K = math.ceil(d_out / S)
            self.groups[name] = Group(name, kind, rows, K, S, d_in, d_out)
            rows += K
        self.n_rows = rows
        self.e_width = max(g.rows for g in self.groups.values())  # K_max: the one-hot index register
        self.width = self.e_width + max(g.slots * (g.d_in + 1) for g in self.groups.values())

    def slot(self, group: Group, s: int) -> int:
        """First coordinate of slot s (its bias is at ``slot + d_in``)."""
        return self.e_width + s * (group.d_in + 1)

    def encode(self, X: torch.Tensor, group: Group, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Write ``weight`` (d_out, d_in), ``bias`` (d_out,) and the index one-hots into the group's rows."""
        S, K, d_in = group.slots, group.rows, group.d_in
        packed = torch.zeros(S * K, d_in + 1, dtype=X.dtype, device=X.device)
        packed[:group.d_out, :d_in] = weight
        if bias is not None:
            packed[:group.d_out, d_in] = bias
        rows = X[group.start:group.start + K]
        rows[:, self.e_width:self.e_width + S * (d_in + 1)] = packed.view(S, K, d_in + 1).transpose(0, 1) \
            .reshape(K, S * (d_in + 1))
        rows[torch.arange(K), torch.arange(K)] = 1.0

    def decode(self, X: torch.Tensor, group: Group) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight (..., d_out, d_in), bias (..., d_out)) read back from the group's rows of X (..., P, W)."""
        S, K, d_in = group.slots, group.rows, group.d_in
        rows = X[..., group.start:group.start + K, self.e_width:self.e_width + S * (d_in + 1)]
        packed = rows.reshape(*rows.shape[:-2], K, S, d_in + 1).transpose(-3, -2).reshape(*rows.shape[:-2],
                                                                                        S * K, d_in + 1)
        return packed[..., :group.d_out, :d_in], packed[..., :group.d_out, d_in]
