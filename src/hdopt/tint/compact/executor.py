"""Running one module application of the compact TinT's program, two ways that compute the same function.

An application is a module and a :class:`Site`: the row blocks it reads and writes and the attention pattern
between them. Row blocks are named: ``tok`` (the input tokens), ``mem<i>`` (T rows that keep the input of
simulated layer i), ``grp:<group>`` (the prefix rows of one packed linear map).

* :func:`apply_dense` builds the (N, N) hard mask and the (N, 1) row gate and calls the module's own
  ``forward`` on the whole state: the reference semantics, used by the tests on small models;
* :class:`SlicedRunner` computes the same outputs on the rows and coordinates that can be non-zero: masked
  blocks of the attention matrix are skipped, and each fixed-pattern weight is applied through its non-zero
  columns (a gather when every output reads one coordinate). The terms it skips are exact zeros (zero weights,
  zero masks), so it differs from :func:`apply_dense` only by the order of floating-point sums (tested).

Patterns: ``rows`` (row-wise module), ``full`` (every query row sees every key row), ``causal`` (the
auxiliary's attention mask between two token-aligned blocks), ``pair`` (row i sees row i of the key block) and
``shift`` (row i sees row i + 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hdopt.tint.compact.modules import TransposedAttention, VocabAttention
from hdopt.tint.functional import activation
from hdopt.tint.gadgets import MLP, Attention, Norm, RMSNorm

PATTERNS = ("rows", "full", "causal", "pair", "shift")


@dataclass(frozen=True)
class Site:
    """Where a module runs: query (or row-wise) rows, key rows and the pattern between them."""

    rows: str
    keys: str | None = None
    pattern: str = "rows"

    def __post_init__(self) -> None:
        assert self.pattern in PATTERNS and (self.keys is None) == (self.pattern == "rows"), self


class RowMap:
    """Row ranges of the state: P prefix rows, then ``tok``, then one block of T rows per ``mem<i>``."""

    def __init__(self, groups: dict, n_prefix: int, T: int, n_mem: int):
        self.groups, self.P, self.T, self.n_mem = groups, n_prefix, T, n_mem
        self.N = n_prefix + T * (1 + n_mem)

    def __call__(self, block: str) -> tuple[int, int]:
        """(first row, number of rows) of a named block."""
        if block == "tok":
            return self.P, self.T
        if block.startswith("mem"):
            return self.P + self.T * (1 + int(block[3:])), self.T
        g = self.groups[block.removeprefix("grp:")]
        return g.start, g.rows


class State:
    """The state (B, N, W) in two parts: the prefix rows, of which only the first ``pre.shape[-1]``
    coordinates can be non-zero (no module writes beyond the packed slots), and the other rows."""

    def __init__(self, pre: torch.Tensor, rest: torch.Tensor):
        self.pre, self.rest = pre, rest

    def block(self, rows: RowMap, name: str) -> torch.Tensor:
        """A view of the named rows (prefix views are narrower than W)."""
        r0, n = rows(name)
        if r0 < rows.P:
            return self.pre[:, r0:r0 + n]
        return self.rest[:, r0 - rows.P:r0 - rows.P + n]

    def full(self) -> torch.Tensor:
        """(B, N, W), the prefix rows padded with zeros."""
        pad = self.rest.shape[-1] - self.pre.shape[-1]
        return torch.cat((F.pad(self.pre, (0, pad)), self.rest), 1)

    def set_full(self, X: torch.Tensor) -> None:
        P, Wp = self.pre.shape[1:]
        assert not X[:, :P, Wp:].any(), "a module wrote beyond the prefix rows' packed coordinates"
        self.pre, self.rest = X[:, :P, :Wp].contiguous(), X[:, P:].contiguous()


# ---------------------------------------------------------------- dense: the modules' own forward
def dense_mask(site: Site, rows: RowMap, aux_allowed: torch.Tensor, softmax: bool) -> torch.Tensor:
    """(N, N) 'may attend' of an attention site; rows with nothing to attend see themselves (softmax)."""
    N = rows.N
    m = torch.zeros(N, N, dtype=torch.bool)
    q0, nq = rows(site.rows)
    k0, nk = rows(site.keys)
    if site.pattern == "full":
        m[q0:q0 + nq, k0:k0 + nk] = True
    elif site.pattern == "causal":
        m[q0:q0 + nq, k0:k0 + nk] = aux_allowed
    else:
        shift = 1 if site.pattern == "shift" else 0
        i = torch.arange(nq - shift)
        m[q0 + i, k0 + i + shift] = True
    if softmax:
        m |= torch.eye(N, dtype=torch.bool) & ~m.any(-1, keepdim=True)
    return m


def apply_dense(module: nn.Module, state: State, site: Site, rows: RowMap, aux_allowed: torch.Tensor) -> None:
    """``X = module(X, mask, gate)`` on the whole state (the written rows are the query rows, or the key rows
    of a :class:`TransposedAttention`)."""
    X = state.full()
    out_block = site.keys if isinstance(module, TransposedAttention) else site.rows
    r0, n = rows(out_block)
    gate = torch.zeros(rows.N, 1, dtype=X.dtype)
    gate[r0:r0 + n] = 1.0
    mask = None
    if site.pattern != "rows":
        mask = dense_mask(site, rows, aux_allowed, getattr(module, "softmax", False))
    state.set_full(module(X, mask, gate))


# ---------------------------------------------------------------- sliced: the same without exact zeros
class SlicedLinear:
    """A fixed-pattern ``nn.Linear`` weight (out, in) applied through its non-zero entries only."""

    def __init__(self, weight: torch.Tensor):
        nz = weight != 0
        self.d_out = weight.shape[0]
        if int(nz.sum(1).max()) <= 1:  # every output reads at most one input: a scaled gather
            self.idx = nz.to(torch.uint8).argmax(1)
            self.scale = weight.gather(1, self.idx[:, None]).squeeze(1)
            self.sub = None
        else:
            self.cols = nz.any(0).nonzero().squeeze(1)
            self.sub = weight[:, self.cols].contiguous()
        self.rows = nz.any(1).nonzero().squeeze(1)  # for writes: the state coordinates that change

    def read(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out), as ``x @ weight.T``."""
        if self.sub is None:
            return x[..., self.idx] * self.scale
        return x[..., self.cols] @ self.sub.T

    def write(self, X: torch.Tensor, y: torch.Tensor) -> None:
        """``X += y @ weight.T`` in place, on the coordinates the weight can change (X: a state view)."""
        if self.sub is None:
            contrib = y[..., self.idx[self.rows]] * self.scale[self.rows]
        else:
            contrib = y[..., self.cols] @ self.sub[self.rows].T
        X.index_add_(X.dim() - 1, self.rows, contrib)


class SlicedRunner:
    """Applies modules in place, computing only the blocks and coordinates that can be non-zero."""

    def __init__(self) -> None:
        self._cache: dict[int, SlicedLinear] = {}

    def lin(self, layer: nn.Linear) -> SlicedLinear:
        key = id(layer)
        if key not in self._cache:
            self._cache[key] = SlicedLinear(layer.weight.detach())
        return self._cache[key]

    def __call__(self, module: nn.Module, state: State, site: Site, rows: RowMap,
                 aux_allowed: torch.Tensor) -> None:
        if isinstance(module, Attention):
            self._attention(module, state.block(rows, site.rows), state.block(rows, site.keys), site,
                            aux_allowed)
            return
        Xr = state.block(rows, site.rows)
        if isinstance(module, Norm):
            z = self.lin(module.read).read(Xr)
            if isinstance(module, RMSNorm):
                y = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + module.eps)
            else:
                y = F.layer_norm(z, z.shape[-1:], eps=module.eps)
            self.lin(module.write).write(Xr, y)
        elif isinstance(module, MLP):
            h = self.lin(module.fc).read(Xr)
            h = F.relu(h) if module.act == "relu" else activation(module.act, h)
            self.lin(module.proj).write(Xr, h)
        elif isinstance(module, VocabAttention):
            self.lin(module.o).write(Xr, module.attend(self.lin(module.q).read(Xr)))
        else:
            raise TypeError(f"no sliced rule for {type(module).__name__}")

    def _attention(self, m: Attention, Xq: torch.Tensor, Xk: torch.Tensor, site: Site,
                   aux_allowed: torch.Tensor) -> None:
        """Attention from the query rows ``Xq`` to the key rows ``Xk`` (views of the state)."""
        transposed = isinstance(m, TransposedAttention)
        B, h = Xq.shape[0], m.heads

        def heads(t: torch.Tensor, d: int) -> torch.Tensor:
            return t.view(B, t.shape[1], h, d).transpose(1, 2)  # (B, h, n, d)

        q = heads(self.lin(m.q).read(Xq), m.dqk)
        k = heads(self.lin(m.k).read(Xk), m.dqk)
        v = heads(self.lin(m.v).read(Xq if transposed else Xk), m.dv)
        if site.pattern in ("pair", "shift"):
            assert not transposed
            if site.pattern == "shift":
                q, k, v = q[:, :, :-1], k[:, :, 1:], v[:, :, 1:]
            s = (q * k).sum(-1, keepdim=True)
            out = (torch.ones_like(s) if m.softmax else s) * v  # softmax over one key is exactly 1
            if site.pattern == "shift":  # the last row has no key: a linear head gives 0 there
                out = torch.cat((out, out.new_zeros(B, h, 1, m.dv)), 2)
        else:
            s = q @ k.mT  # (B, h, nq, nk)
            mask = aux_allowed if site.pattern == "causal" else None
            if m.softmax:
                s = torch.softmax(s if mask is None else s.masked_fill(~mask, float("-inf")), -1)
            elif mask is not None:
                s = s * mask
            out = s.mT @ v if transposed else s @ v
        out = out.transpose(1, 2).reshape(B, out.shape[2], h * m.dv)
        self.lin(m.o).write(Xk if transposed else Xq, out)
