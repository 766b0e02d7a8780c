"""The two modules the compact TinT adds to :mod:`hdopt.tint.gadgets` (which it reuses for the rest).

* :class:`TransposedAttention`: softmax attention whose probability matrix is applied transposed,
  ``out_t = sum_s A[s, t] v_s``: the attention backward with detached probabilities, recomputed from the
  stored queries and keys (the reference's ``AttentionBackward`` does the same, instead of storing A);
* :class:`VocabAttention`: softmax attention from each token to a fixed table of V key/value vectors (the
  output embeddings): ``E^T softmax(E q)``, the expected output embedding that the loss gradient needs. Its
  table is the TinT's own output embedding (counted once, with the embeddings).

Both follow the gadgets' convention: residual ``X + gate * f(X)`` on the state ``X`` (B, N, W), hard masks,
fixed 0/+-c weights filled by :class:`hdopt.tint.gadgets.Patterns`.
"""

from __future__ import annotations

import torch
from torch import nn

from hdopt.tint.gadgets import Attention


class TransposedAttention(Attention):
    """``gate * o(A^T v)`` with ``A = softmax(masked q k^T)`` row-wise: row s's probabilities over keys t.

    Queries and values are read at the query rows s, keys at the key rows t, and the output lands at the key
    rows: ``out_t = sum_s A[s, t] v_s``. ``gate`` marks the key rows.
    """

    def __init__(self, width: int, heads: int, dqk: int, dv: int, device=None, dtype=None):
        super().__init__(width, heads, dqk, dv, softmax=True, device=device, dtype=dtype)

    def forward(self, X: torch.Tensor, allowed: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        B, N, _ = X.shape
        q = self.q(X).view(B, N, self.heads, self.dqk).transpose(1, 2)
        k = self.k(X).view(B, N, self.heads, self.dqk).transpose(1, 2)
        v = self.v(X).view(B, N, self.heads, self.dv).transpose(1, 2)
        probs = torch.softmax((q @ k.mT).masked_fill(~allowed, float("-inf")), -1)  # (B, h, N_s, N_t)
        out = (probs.mT @ v).transpose(1, 2).reshape(B, N, self.heads * self.dv)
        return X + gate * self.o(out)


class VocabAttention(nn.Module):
    """``gate * o(E^T softmax(E q X))``: one softmax head over the V rows of the table ``E`` (V, d).

    ``E`` is held as a non-persistent buffer: it is the output embedding, already counted by the TinT.
    """

    def __init__(self, width: int, table: torch.Tensor, device=None, dtype=None):
        super().__init__()
        kw = {"bias": False, "device": device, "dtype": dtype}
        d = table.shape[1]
        self.q, self.o = nn.Linear(width, d, **kw), nn.Linear(d, width, **kw)
        nn.init.zeros_(self.q.weight)
        nn.init.zeros_(self.o.weight)
        self.register_buffer("table", table, persistent=False)

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        """(..., d) queries -> (..., d) expected table row."""
        return torch.softmax(q @ self.table.mT, -1) @ self.table

    def forward(self, X: torch.Tensor, allowed: torch.Tensor | None, gate: torch.Tensor) -> torch.Tensor:
        return X + gate * self.o(self.attend(self.q(X)))
