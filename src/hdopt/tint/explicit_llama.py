"""The explicit TinT for Llama-family auxiliaries: RMSNorm, SwiGLU, RoPE and grouped-query attention.

:class:`ExplicitLlamaTinT` is :class:`hdopt.tint.explicit.ExplicitTinT` (same state, prefix rows, gadgets,
attention with GQA, loss gradient and attention backward) with these hooks overridden:

* layout: prefix groups ``ln1, qkv (q | k | v rows), o, ln2, gu (gate | up rows), down`` per block; token
  registers ``At(Act.R)`` (q, k after RoPE), ``Reg.COS``/``Reg.SIN`` (the rotary tables at the token's
  position), ``Act.S`` (silu(gate)) and ``Reg.DS``; ``Act.H`` = [gate, up] with views ``Act.G``, ``Act.UP``
  (and ``Reg.DH`` = [d gate, d up] with views ``Reg.DG``, ``Reg.DUP``);
* :meth:`_prologue`: also writes cos/sin of each token's position (a diagonal head whose value weights are the
  rotary tables at ``max_len`` positions);
* :meth:`attention_qk`: RoPE ``x cos + rotate_half(x) sin`` by :meth:`products`, one head per q/k coordinate
  with two-coordinate queries and keys, ``q = [x_j, -+x_partner]``, ``k = [cos_j, sin_j]``;
* :meth:`mlp_forward`: ``a = silu(gate) * up`` (the product gadget), :meth:`mlp_backward`: ``d up = da * s``,
  ``d s = da * up`` (products), ``d gate = N [silu(gate + ds/N) - silu(gate)]``.

:meth:`products` computes ``dst_i += sum_m a_im b_im`` in every token row with a linear-attention module and
the token-to-itself mask (head i: ``q = a_i``, ``k = b_i``, value the constant 1): the score is exactly the
product. RMSNorm is the real :class:`hdopt.tint.gadgets.RMSNorm` module (gains are diagonal prefix rows).

Reference rule, as :mod:`hdopt.tint.backward` computes it for Llama: attention probabilities detached (W_Q,
W_K get no gradient: their rows of the qkv group see a zero gradient), RMSNorm and silu backward by finite
differences, norm gains frozen, biases updated only where the auxiliary has them. RoPE's transpose is never
needed (no gradient reaches q or k).
"""

from __future__ import annotations

from functools import partial

import torch

from hdopt.tint.explicit import ExplicitTinT
from hdopt.tint.explicit_layout import Act, At, Group, Keys, Map, Reg, Register, Route
from hdopt.tint.functional import rope_tables
from hdopt.tint.gadgets import AttentionPattern, Entries, RMSNorm


def _entries(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor | None = None) -> Entries:
    """Entries of a weight from index tensors (hashable, so equal patterns share one module)."""
    values_ = None if values is None else tuple(values.tolist())
    return Entries(tuple(rows.tolist()), tuple(cols.tolist()), values_)


class ExplicitLlamaTinT(ExplicitTinT):
    """Explicit TinT of a Llama-family auxiliary (``backward='reference'``); see the module docstring."""

    FAMILY = "llama"
    NORM = RMSNorm
    TOKENS = (*ExplicitTinT.TOKENS, At(Act.R), Reg.COS, Reg.SIN)
    ACTS = (Act.N1, Act.U1, Act.O, Act.N2, Act.U2, Act.H, Act.S, Act.A)
    BACKWARD = (Reg.DA, Reg.DS, Reg.DH, Reg.DU2, Reg.DN2, Reg.DO, Reg.DQKV, Reg.DU1, Reg.DN1)
    TRANSIENT = (At(Act.QKV), At(Act.R))

    # ------------------------------------------------------------------ layout
    def _layer_groups(self) -> list[tuple[Map, int, int]]:
        D, Fd = self.spec.d_model, self.spec.d_ff
        attention = super()._layer_groups()[:4]  # ln1, qkv, o, ln2
        return [*attention, (Map.GU, 2 * Fd, D), (Map.DOWN, D, Fd)]

    def _widths(self) -> dict[Reg | Act, int]:
        dh, Fd = self.spec.head_dim, self.spec.d_ff
        return {**super()._widths(), Act.H: 2 * Fd, Act.S: Fd, Act.R: self.dq + self.dkv, Reg.COS: dh,
                Reg.SIN: dh, Reg.DS: Fd, Reg.DH: 2 * Fd}

    def _layout_tokens(self) -> None:
        super()._layout_tokens()
        Fd = self.spec.d_ff
        for layer in [None, *self.tops]:
            self.tok.view(At(Act.G, layer), At(Act.H, layer), 0, Fd)
            self.tok.view(At(Act.UP, layer), At(Act.H, layer), Fd, Fd)
        self.tok.view(Reg.DG, Reg.DH, 0, Fd)
        self.tok.view(Reg.DUP, Reg.DH, Fd, Fd)

    def _cols(self, reg: Register, start: int = 0, n: int | None = None) -> torch.Tensor:
        """Absolute state columns of a token register (or a part of it)."""
        s, length = self.tok[reg]
        return torch.arange(s + start, s + start + (length - start if n is None else n))

    # ------------------------------------------------------------------ gadgets
    def products(self, a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, dst: torch.Tensor) -> None:
        """``X[dst_i] += sum_m a_scale[i, m] X[a[i, m]] X[b[i, m]]`` in every token row, exactly.

        ``a``, ``b``, ``a_scale``: (n, m) state columns and signs; ``dst``: (n,). One linear-attention head
        per i with the token-to-itself mask: ``q = a_i``, ``k = b_i`` (m coordinates), value 1.
        """
        n, m = a.shape
        one = self.tok[Reg.ONE][0]
        heads = torch.arange(n * m)
        self._apply(AttentionPattern(n, m, 1, False, q=_entries(heads, a.flatten(), a_scale.flatten()),
                                     k=_entries(heads, b.flatten()),
                                     v=_entries(torch.arange(n), torch.full((n,), one)),
                                     o=_entries(dst, torch.arange(n))), Route(keys=Keys.SELF))

    def _pair(self, a: Register, b: Register, dst: Register) -> tuple[torch.Tensor, ...]:
        """Arguments of :meth:`products` for the elementwise product ``dst += a * b``."""
        a_cols = self._cols(a)[:, None]
        return a_cols, torch.ones(a_cols.shape), self._cols(b)[:, None], self._cols(dst)

    def attention_qk(self) -> Register:
        """At(Act.R) = RoPE of the q and k parts of At(Act.QKV) (cos/sin hold the token's position)."""
        dh, n = self.spec.head_dim, self.dq + self.dkv
        i = torch.arange(n)
        j, half = i % dh, dh // 2
        first = j < half  # rotate_half(x)_j = -x_{j+half} for j < half, x_{j-half} otherwise
        partner = torch.where(first, i + half, i - half)
        qkv = self._cols(At(Act.QKV))
        a = torch.stack((qkv[i], qkv[partner]), 1)
        a_scale = torch.stack((torch.ones(n), torch.where(first, -1.0, 1.0)), 1)
        b = torch.stack((self._cols(Reg.COS)[j], self._cols(Reg.SIN)[j]), 1)
        self.products(a, a_scale, b, self._cols(At(Act.R)))
        return At(Act.R)

    # ------------------------------------------------------------------ program
    def _prologue(self) -> None:
        """Also write cos/sin of each token's position: a diagonal head with value = tables^T onehot(t)."""
        super()._prologue()
        T, dh = self.config.max_len, self.spec.head_dim
        table = None
        if self.device is None or torch.device(self.device).type != "meta":
            cos, sin = rope_tables(self.spec, torch.arange(T), self.dtype)
            table = torch.cat((cos, sin), 1).T.flatten()  # (2 dh) x T, row-major
        rows = torch.arange(2 * dh).repeat_interleave(T)
        cols = self._cols(Reg.POS).repeat(2 * dh)
        self._apply(AttentionPattern(1, 1, 2 * dh, False, q=(self._t(Reg.ONE),), k=(self._t(Reg.ONE),),
                                     v=_entries(rows, cols, table),
                                     o=(self._t(Reg.COS), self._t(Reg.SIN, off=dh))), Route(keys=Keys.SELF))

    def mlp_forward(self, layer: int, keep: bool) -> None:
        """x += down(silu(gate u2) * up u2)."""
        D, Fd = self.spec.d_model, self.spec.d_ff
        at, grp = partial(At, layer=layer if keep else None), partial(Group, layer=layer)
        self.lin_forward(grp(Map.GU), at(Act.U2), at(Act.H), D, 2 * Fd)
        self.act([self._t(at(Act.G))], at(Act.S))
        self.products(*self._pair(at(Act.S), at(Act.UP), at(Act.A)))
        self.lin_forward(grp(Map.DOWN), at(Act.A), Reg.X, Fd, D)

    def mlp_backward(self, layer: int) -> None:
        """Backward and update of the SwiGLU MLP; leaves d loss / d (MLP input) in du2."""
        D, Fd, N = self.spec.d_model, self.spec.d_ff, self.config.fd_scale
        at, grp = partial(At, layer=layer), partial(Group, layer=layer)
        self.lin_backward(grp(Map.DOWN), Reg.G, Reg.DA, Fd, D)
        self.lin_update(grp(Map.DOWN), Reg.G, at(Act.A), Fd, D, self.has_bias(layer, Map.DOWN))
        # d up = da * silu(g), d silu(g) = da * up
        pairs = [self._pair(Reg.DA, at(Act.S), Reg.DUP), self._pair(Reg.DA, at(Act.UP), Reg.DS)]
        self.products(*(torch.cat(parts) for parts in zip(*pairs, strict=True)))
        self.act([self._t(at(Act.G)), self._t(Reg.DS, scale=1.0 / N)], Reg.DG, scale=N)
        self.linmap([(at(Act.S), Reg.DG, -N)])
        self.lin_backward(grp(Map.GU), Reg.DH, Reg.DU2, D, 2 * Fd)
        self.lin_update(grp(Map.GU), Reg.DH, at(Act.U2), D, 2 * Fd, self.has_bias(layer, Map.GU))
