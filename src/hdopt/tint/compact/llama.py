"""The compact TinT for Llama-family auxiliaries: RMSNorm, SwiGLU, RoPE and grouped-query attention.

The program of :class:`hdopt.tint.compact.program.CompactTinT` with, per block, the groups
``ln1, qk (q | k rows), v, o, ln2`` and per MLP chunk ``gu<i> (gate | up rows of the chunk), down<i>``, plus:

* elementwise products of two token registers: a linear-attention module, each row attending to itself, whose
  head i has ``q = a_i``, ``k = b_i`` and value the constant 1, written to ``dst_i`` (the score is exactly
  ``a_i b_i``): SwiGLU's ``silu(g) * up`` and the backward's ``da * silu(g)`` and ``da * up``;
* RoPE ``x cos + rotate_half(x) sin``: one such head per q/k coordinate with two-coordinate queries and keys,
  ``q = [x_j, -+x_partner]``, ``k = [cos_j, sin_j]``; cos/sin are input registers (the TinT's positional
  embedding: the rotary tables at ``max_len`` positions, counted with its embeddings);
* RMSNorm modules without gain (gains are diagonal prefix groups, frozen by the rule);
* grouped-query attention: query head h reads key/value head ``h // rep``; in the backward the query heads of
  a group add into the same ``dv`` coordinates.

Reference rule as :mod:`hdopt.tint.backward` computes it for Llama: detached probabilities (no RoPE
transpose needed), ``dg = N [silu(g + ds/N) - silu(g)]``, RMSNorm backward by the same finite difference,
gains frozen, biases updated only where the auxiliary has them.
"""

from __future__ import annotations

import torch
from torch import nn

from hdopt.tint.aux import Block
from hdopt.tint.compact.executor import Site
from hdopt.tint.compact.program import CompactTinT, cat_or_none
from hdopt.tint.functional import rope_tables
from hdopt.tint.gadgets import Attention, RMSNorm


class CompactLlamaTinT(CompactTinT):
    """Compact explicit TinT of a Llama-family auxiliary (``backward='reference'``)."""

    FAMILY = "llama"
    NORM = RMSNorm
    MLP_REGISTERS = 8  # gate|up, s = silu(gate), a = s * up, da, ds, d gate|d up
    QK = "r"

    def attention_width(self) -> int:
        return 3 * self.dq + 3 * self.dkv  # q, k, v, o and the rotated r = [q | k]

    def _mlp_maps(self, layer: int) -> list[tuple[str, str, int, int]]:
        D, c = self.spec.d_model, self.chunk
        return [m for i in range(self.n_chunks) for m in ((f"{layer}.gu{i}", "gu", D, 2 * c),
                                                          (f"{layer}.down{i}", "down", c, D))]

    def _extra_inputs(self) -> list[tuple[str, int]]:
        return [("cos", self.spec.head_dim), ("sin", self.spec.head_dim)]

    def _mlp_views(self) -> list[tuple[str, int]]:
        c = self.chunk
        return [("gu", 2 * c), ("s", c), ("a", c), ("da", c), ("ds", c), ("dgu", 2 * c)]

    def _layout_tokens(self) -> None:
        super()._layout_tokens()
        t, c, Dq, Dkv = self.tok, self.chunk, self.dq, self.dkv
        t.view("r", "R", 2 * Dq + 2 * Dkv, Dq + Dkv)
        for name, parent, start in (("gate", "gu", 0), ("up", "gu", c), ("dg", "dgu", 0), ("dup", "dgu", c)):
            t.view(name, parent, start, c)

    def attention_scratch(self) -> list[str]:
        return ["q", "k", "v", "o", "r"]

    # ------------------------------------------------------------------ gadgets
    def _cols(self, name: str) -> torch.Tensor:
        s, n = self.tok[name]
        return torch.arange(s, s + n)

    def products(self, a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, dst: torch.Tensor) -> None:
        """``X[dst_i] += sum_m a_scale[i, m] X[a[i, m]] X[b[i, m]]`` in every token row, exactly.

        ``a``, ``b``, ``a_scale``: (n, m) state columns and signs; ``dst``: (n,). One linear-attention head
        per i, each row attending to itself: ``q = a_i``, ``k = b_i`` (m coordinates), value 1.
        """
        n, m = a.shape
        one = self.tok["one"][0]

        def fill(mod: nn.Module) -> None:
            P = self.patterns
            P.entries(mod.q.weight, torch.arange(n * m), a.flatten(), a_scale.flatten())
            P.entries(mod.k.weight, torch.arange(n * m), b.flatten())
            P.entries(mod.v.weight, torch.arange(n), torch.full((n,), one))
            P.entries(mod.o.weight, dst, torch.arange(n))
        key = ("products", tuple(a.flatten().tolist()), tuple(a_scale.flatten().tolist()),
               tuple(b.flatten().tolist()), tuple(dst.tolist()))
        self._op(key, lambda: Attention(self.width, n, m, 1, False, self.device, self.dtype), fill,
                 Site("tok", "tok", "pair"))

    def _pairs(self, *triples: tuple[str, str, str]) -> tuple[torch.Tensor, ...]:
        """Arguments of :meth:`products` for elementwise products ``dst += a * b`` of (a, b, dst)."""
        a = torch.cat([self._cols(x) for x, _, _ in triples])[:, None]
        b = torch.cat([self._cols(y) for _, y, _ in triples])[:, None]
        dst = torch.cat([self._cols(z) for _, _, z in triples])
        return a, torch.ones(a.shape), b, dst

    def rope(self) -> None:
        """r = RoPE of the q and k parts of qk (cos/sin hold the token's position)."""
        dh, n = self.spec.head_dim, self.dq + self.dkv
        i = torch.arange(n)
        j, half = i % dh, dh // 2
        first = j < half  # rotate_half(x)_j = -x_{j+half} for j < half, x_{j-half} otherwise
        partner = torch.where(first, i + half, i - half)
        qk = self._cols("qk")
        a = torch.stack((qk[i], qk[partner]), 1)
        a_scale = torch.stack((torch.ones(n), torch.where(first, -1.0, 1.0)), 1)
        b = torch.stack((self._cols("cos")[j], self._cols("sin")[j]), 1)
        self.products(a, a_scale, b, self._cols("r"))

    # ------------------------------------------------------------------ program
    def attention_inputs(self, layer: int) -> None:
        super().attention_inputs(layer)
        self.rope()

    def mlp_chunk_forward(self, layer: int, i: int, accumulate: bool = True) -> None:
        """gate|up = gu_i(u), s = silu(gate), a = s * up; x += down_i(a) when ``accumulate``."""
        self.lin_forward(f"{layer}.gu{i}", "u", "gu")
        self.act([self._t("gate")], "s")
        self.products(*self._pairs(("s", "up", "a")))
        if accumulate:
            self.lin_forward(f"{layer}.down{i}", "a", "x")

    def mlp_chunk_backward(self, layer: int, i: int) -> None:
        """Chunk i of SwiGLU: d up = da * s, ds = da * up, d gate = N [silu(g + ds/N) - s]; updates."""
        self.mlp_chunk_forward(layer, i, accumulate=False)
        self.output_projection_step(f"{layer}.down{i}", "a", "da", first_chunk=i == 0)
        self.products(*self._pairs(("da", "s", "dup"), ("da", "up", "ds")))
        self.act_backward("gate", "ds", "s", "dg")
        self.lin_backward(f"{layer}.gu{i}", "dgu", "du")
        self.lin_update(f"{layer}.gu{i}", "dgu", "u", bias=self.has_bias("gu"))

    # ------------------------------------------------------------------ inputs
    def _mlp_entries(self, layer: int, b: Block):
        """The gated MLP's packed maps: gate and up together, then down, chunk by chunk."""
        c = self.chunk
        for i in range(self.n_chunks):
            part = slice(i * c, (i + 1) * c)
            gb, ub = b.get("gate.b"), b.get("up.b")
            yield (f"{layer}.gu{i}", torch.cat((b["gate.w"][part], b["up.w"][part])),
                   cat_or_none(None if gb is None else gb[part], None if ub is None else ub[part]))
            yield f"{layer}.down{i}", b["down.w"][:, part], b.get("down.b") if i == 0 else None

    def _mlp_from(self, read: dict) -> Block:
        c = self.chunk
        gus = [read[f"gu{i}"] for i in range(self.n_chunks)]
        downs = [read[f"down{i}"] for i in range(self.n_chunks)]
        return {"gate.w": torch.cat([w[:, :c] for w, _ in gus], -2),
                "up.w": torch.cat([w[:, c:] for w, _ in gus], -2),
                "gate.b": torch.cat([x[:, :c] for _, x in gus], -1),
                "up.b": torch.cat([x[:, c:] for _, x in gus], -1),
                "down.w": torch.cat([w for w, _ in downs], -1), "down.b": downs[0][1]}

    def _encode_rows(self, state, rows, ids, weights, positions) -> None:
        super()._encode_rows(state, rows, ids, weights, positions)
        tok = state.block(rows, "tok")
        cos, sin = rope_tables(self.spec, positions, self.dtype)
        for name, table in (("cos", cos), ("sin", sin)):
            s, n = self.tok[name]
            tok[..., s:s + n] = table

    def embedding_params(self) -> int:
        """Also the rotary tables (cos and sin at ``max_len`` positions), the TinT's positional embedding."""
        return super().embedding_params() + 2 * self.config.max_len * self.spec.head_dim
