"""The real transformer modules of the explicit TinT, and the registers their fixed weights address.

Every module is a residual sublayer ``X <- X + gate * f(X)`` on the TinT state ``X`` (B, N, W) whose rows are
prefix tokens (holding auxiliary weights) followed by input tokens. ``gate`` (N, 1) is a hard 0/1 row mask
(the reference uses tanh gates, which leak 1 - tanh(10); a hard mask is exact) and attention modules take a
hard (N, N) mask. Weights are dense matrices with fixed 0/±c patterns; :class:`Patterns` fills them and counts
their non-zeros (what the structured realization replaces by index ops).

* :class:`Attention`: multi-head attention, with softmax or linear (no softmax: scores are multiplied by the
  0/1 mask). Linear heads simulate the auxiliary's linear layers against prefix rows, elementwise gating,
  shifts and transposed attention; softmax heads simulate the auxiliary's attention and softmax over the
  vocabulary rows.
* :class:`MLP`: ``proj(act(fc X))``; with ReLU and ``[P; -P]`` weights it is an exact linear map
  (``relu(z) - relu(-z) = z``) used for copies, clears and finite differences.
* :class:`Norm`: ``write(LayerNorm(read X))`` without affine parameters; :class:`RMSNorm`: the same with
  ``z / rms(z)`` (Llama family).

A module together with its fixed weights is described as data by :class:`AttentionPattern`,
:class:`MLPPattern` or :class:`NormPattern` (frozen, hashable): a program builds each distinct pattern once
and applies it wherever it recurs.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from hdopt.tint.functional import activation

K = TypeVar("K", bound=Hashable)


class Registers(Generic[K]):
    """Named coordinate ranges of a row of the TinT state (names: strings or typed keys)."""

    def __init__(self) -> None:
        self.slots: dict[K, tuple[int, int]] = {}
        self.width = 0

    def add(self, name: K, n: int) -> None:
        assert name not in self.slots, name
        self.slots[name] = (self.width, n)
        self.width += n

    def __getitem__(self, name: K) -> tuple[int, int]:
        if name not in self.slots:
            raise KeyError(f"register {name!r} is not part of this layout")
        return self.slots[name]

    def has(self, name: K) -> bool:
        return name in self.slots

    def view(self, name: K, parent: K, start: int, n: int) -> None:
        """Name coordinates ``start .. start + n`` of an existing register (no new width)."""
        assert name not in self.slots and start + n <= self.slots[parent][1], name
        self.slots[name] = (self.slots[parent][0] + start, n)


# A read term: (register start, length, scale, offset in the module's input/output vector).
Term = tuple[int, int, float, int]


@dataclass(frozen=True)
class Entries:
    """Explicit non-zeros of a weight: ``weight[rows[i], cols[i]] += values[i]`` (1 when values is None)."""

    rows: tuple[int, ...]
    cols: tuple[int, ...]
    values: tuple[float, ...] | None = None


# How one weight is filled: read terms (input-side weights), write terms (the output weight), or entries.
Fill = tuple[Term, ...] | Entries


class Patterns:
    """Fills dense weights with fixed patterns and counts their non-zeros."""

    def __init__(self) -> None:
        self.nonzeros = 0

    def read(self, weight: torch.Tensor, terms: list[Term]) -> None:
        """weight (d, W): module input coord ``off + i`` = sum of ``scale * X[start + i]`` over terms."""
        for start, n, scale, off in terms:
            self._place(weight, torch.arange(off, off + n), torch.arange(start, start + n), scale)

    def write(self, weight: torch.Tensor, terms: list[Term]) -> None:
        """weight (W, d): ``X[start + i] += scale * out[off + i]``."""
        for start, n, scale, off in terms:
            self._place(weight, torch.arange(start, start + n), torch.arange(off, off + n), scale)

    def entries(self, weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                values: torch.Tensor | None = None) -> None:
        """``weight[rows[i], cols[i]] += values[i]`` (1 when None; fixed tables such as RoPE's cos/sin)."""
        if weight.device.type != "meta":
            vals = torch.ones(len(rows), dtype=weight.dtype) if values is None else values.to(weight.dtype)
            weight.index_put_((rows, cols), vals, accumulate=True)
        self.nonzeros += len(rows)

    def _place(self, weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, scale: float) -> None:
        if weight.device.type != "meta":
            weight[rows, cols] += scale
        self.nonzeros += len(rows)

    def fill(self, weight: torch.Tensor, fill: Fill, write: bool) -> None:
        """Apply ``fill`` to an input-side weight (like :meth:`read`) or, when ``write``, an output weight."""
        if isinstance(fill, Entries):
            values = None if fill.values is None else torch.tensor(fill.values, dtype=torch.float64)
            self.entries(weight, torch.tensor(fill.rows, dtype=torch.long),
                         torch.tensor(fill.cols, dtype=torch.long), values)
        elif write:
            self.write(weight, list(fill))
        else:
            self.read(weight, list(fill))


class Attention(nn.Module):
    """``gate * o(attn(q X, k X, v X))``, ``heads`` heads of widths (dqk, dv); softmax or linear."""

    def __init__(self, width: int, heads: int, dqk: int, dv: int, softmax: bool, device=None, dtype=None):
        super().__init__()
        kw = {"bias": False, "device": device, "dtype": dtype}
        self.heads, self.dqk, self.dv, self.softmax = heads, dqk, dv, softmax
        self.q, self.k = nn.Linear(width, heads * dqk, **kw), nn.Linear(width, heads * dqk, **kw)
        self.v, self.o = nn.Linear(width, heads * dv, **kw), nn.Linear(heads * dv, width, **kw)
        for lin in (self.q, self.k, self.v, self.o):
            nn.init.zeros_(lin.weight)

    def forward(self, X: torch.Tensor, allowed: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        B, N, _ = X.shape
        q = self.q(X).view(B, N, self.heads, self.dqk).transpose(1, 2)  # (B, h, N, dqk)
        k = self.k(X).view(B, N, self.heads, self.dqk).transpose(1, 2)
        v = self.v(X).view(B, N, self.heads, self.dv).transpose(1, 2)  # (B, h, N, dv)
        s = q @ k.mT  # (B, h, N, N); scales live in the q weights
        s = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) if self.softmax else s * allowed
        out = (s @ v).transpose(1, 2).reshape(B, N, self.heads * self.dv)
        return X + gate * self.o(out)


class MLP(nn.Module):
    """``gate * proj(act(fc X))`` with the auxiliary's activation or ReLU."""

    def __init__(self, width: int, hidden: int, act: str, device=None, dtype=None):
        super().__init__()
        kw = {"bias": False, "device": device, "dtype": dtype}
        self.act = act
        self.fc, self.proj = nn.Linear(width, hidden, **kw), nn.Linear(hidden, width, **kw)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.proj.weight)

    def forward(self, X: torch.Tensor, allowed: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        h = self.fc(X)
        h = F.relu(h) if self.act == "relu" else activation(self.act, h)
        return X + gate * self.proj(h)


class Norm(nn.Module):
    """``gate * write(LayerNorm(read X))`` (no affine: gains and biases are simulated by prefix rows)."""

    def __init__(self, width: int, d: int, eps: float, device=None, dtype=None):
        super().__init__()
        kw = {"bias": False, "device": device, "dtype": dtype}
        self.read, self.write = nn.Linear(width, d, **kw), nn.Linear(d, width, **kw)
        nn.init.zeros_(self.read.weight)
        nn.init.zeros_(self.write.weight)
        self.eps = eps

    def forward(self, X: torch.Tensor, allowed: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        z = self.read(X)
        return X + gate * self.write(F.layer_norm(z, z.shape[-1:], eps=self.eps))


class RMSNorm(Norm):
    """``gate * write(RMSNorm(read X))``: ``z / sqrt(mean(z^2) + eps)``, no gain (Llama family)."""

    def forward(self, X: torch.Tensor, allowed: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        z = self.read(X)
        return X + gate * self.write(z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + self.eps))


@dataclass(frozen=True)
class AttentionPattern:
    """An :class:`Attention` module (``heads`` heads of widths ``dqk``/``dv``) and its q, k, v, o fills."""

    heads: int
    dqk: int
    dv: int
    softmax: bool
    q: Fill
    k: Fill
    v: Fill
    o: Fill

    def build(self, width: int, patterns: Patterns, device=None, dtype=None) -> Attention:
        module = Attention(width, self.heads, self.dqk, self.dv, self.softmax, device, dtype)
        with torch.no_grad():
            for lin, fill in ((module.q, self.q), (module.k, self.k), (module.v, self.v)):
                patterns.fill(lin.weight, fill, write=False)
            patterns.fill(module.o.weight, self.o, write=True)
        return module


@dataclass(frozen=True)
class MLPPattern:
    """An :class:`MLP` module (``hidden`` units, activation ``act``) and its fc (read), proj (write) fills."""

    hidden: int
    act: str
    fc: Fill
    proj: Fill

    def build(self, width: int, patterns: Patterns, device=None, dtype=None) -> MLP:
        module = MLP(width, self.hidden, self.act, device, dtype)
        with torch.no_grad():
            patterns.fill(module.fc.weight, self.fc, write=False)
            patterns.fill(module.proj.weight, self.proj, write=True)
        return module


@dataclass(frozen=True)
class NormPattern:
    """A :class:`Norm` or :class:`RMSNorm` (``kind``) over ``d`` coordinates and its read/write fills."""

    kind: type[Norm]
    d: int
    eps: float
    read: Fill
    write: Fill

    def build(self, width: int, patterns: Patterns, device=None, dtype=None) -> Norm:
        module = self.kind(width, self.d, self.eps, device, dtype)
        with torch.no_grad():
            patterns.fill(module.read.weight, self.read, write=False)
            patterns.fill(module.write.weight, self.write, write=True)
        return module


Pattern = AttentionPattern | MLPPattern | NormPattern
