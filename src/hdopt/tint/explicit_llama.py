"""The explicit TinT for Llama-family auxiliaries: RMSNorm, SwiGLU, RoPE and grouped-query attention.

The same state, prefix rows and gadgets as :class:`hdopt.tint.explicit.ExplicitTinT` (linear maps against
prefix rows, stored attention probabilities, finite-difference norm/activation backward, the loss gradient),
with the prefix groups ``ln1, qkv (q | k | v rows), o, ln2, gu (gate | up rows), down`` per block, plus:

* products of two token registers: a linear-attention module with the token-to-itself mask whose head i has
  ``q = a_i``, ``k = b_i`` (one coordinate each) and value the constant-1 register, written to ``dst_i``;
  the score is exactly ``a_i b_i``. It computes SwiGLU's ``silu(g) * up`` and the backward's ``da * s`` and
  ``da * up``;
* RoPE ``x cos + rotate_half(x) sin``: one such head per coordinate with two-coordinate queries and keys,
  ``q = [x_j, -+x_partner]``, ``k = [cos_j, sin_j]``; the ``cos``/``sin`` registers are a linear map of the
  one-hot position (fixed weights: the rotary tables at ``max_len`` positions), written once at the start;
* RMSNorm: a real :class:`hdopt.tint.gadgets.RMSNorm` module (gains are diagonal prefix rows);
* grouped-query attention: query head h reads key/value head ``h // rep``; in the backward the query heads of
  a group add into the same ``dv`` coordinates.

Reference rule, as :mod:`hdopt.tint.backward` computes it for Llama: attention probabilities detached (W_Q,
W_K get no gradient: their rows of the qkv group see a zero gradient), ``dg = N [silu(g + ds/N) - silu(g)]``,
RMSNorm backward by the same finite difference, norm gains frozen, biases updated only where the auxiliary
has them. RoPE's transpose is never needed (no gradient reaches q or k).
"""

from __future__ import annotations

import torch

from hdopt.tint.explicit import ExplicitTinT
from hdopt.tint.functional import rope_tables
from hdopt.tint.gadgets import RMSNorm


class ExplicitLlamaTinT(ExplicitTinT):
    """Explicit TinT of a Llama-family auxiliary (``backward='reference'``); see the module docstring."""

    FAMILY = "llama"
    NORM = RMSNorm
    TOKENS = (*ExplicitTinT.TOKENS, "S.r", "cos", "sin")  # S.r: q and k after RoPE
    SCRATCH = ("n1", "u1", "o", "n2", "u2", "h", "s", "a")  # h = [gate, up] pre-activations, s = silu(gate)
    BACKWARD = ("da", "ds", "dh", "du2", "dn2", "do", "dqkv", "du1", "dn1")  # dh = [d gate, d up]
    MEMBERS = {"ln1": ("ln1",), "qkv": ("q", "k", "v"), "o": ("o",), "ln2": ("ln2",), "gu": ("gate", "up"),
               "down": ("down",)}

    # ------------------------------------------------------------------ layouts
    def _layer_groups(self) -> list[tuple[str, int, int]]:
        D, Fd, Dq, Dkv = self.spec.d_model, self.spec.d_ff, self.dq, self.dkv
        return [("ln1", D, D), ("qkv", Dq + 2 * Dkv, D), ("o", D, Dq), ("ln2", D, D), ("gu", 2 * Fd, D),
                ("down", D, Fd)]

    def _sizes(self) -> dict[str, int]:
        s, Fd, Dq, Dkv = self.spec, self.spec.d_ff, self.dq, self.dkv
        return {**super()._sizes(), "o": Dq, "h": 2 * Fd, "s": Fd, "a": Fd, "qkv": Dq + 2 * Dkv,
                "r": Dq + Dkv, "cos": s.head_dim, "sin": s.head_dim, "da": Fd, "ds": Fd, "dh": 2 * Fd,
                "do": Dq, "dqkv": Dq + 2 * Dkv}

    def _layout_tokens(self) -> None:
        super()._layout_tokens()
        Fd = self.spec.d_ff
        for ns in ["S", *(f"L{i}" for i in self.tops)]:
            self.tok.view(f"{ns}.g", f"{ns}.h", 0, Fd)
            self.tok.view(f"{ns}.up", f"{ns}.h", Fd, Fd)
        self.tok.view("dg", "dh", 0, Fd)
        self.tok.view("dup", "dh", Fd, Fd)

    def _cols(self, name: str, start: int = 0, n: int | None = None) -> torch.Tensor:
        """Absolute state columns of a token register (or a part of it)."""
        s, length = self.tok[name]
        return torch.arange(s + start, s + start + (length - start if n is None else n))

    # ------------------------------------------------------------------ gadgets
    def products(self, key: tuple, a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor,
                 dst: torch.Tensor) -> None:
        """``X[dst_i] += sum_m a_scale[i, m] X[a[i, m]] X[b[i, m]]`` in every token row, exactly.

        ``a``, ``b``, ``a_scale``: (n, m) state columns and signs; ``dst``: (n,). One linear-attention head
        per i with the token-to-itself mask: ``q = a_i``, ``k = b_i`` (m coordinates), value 1.
        """
        n, m = a.shape
        one = self.tok["one"][0]

        def fill(mod) -> None:
            P = self.patterns
            P.entries(mod.q.weight, torch.arange(n * m), a.flatten(), a_scale.flatten())
            P.entries(mod.k.weight, torch.arange(n * m), b.flatten())
            P.entries(mod.v.weight, torch.arange(n), torch.full((n,), one))
            P.entries(mod.o.weight, dst, torch.arange(n))
        self._op(key, self._attn(n, m, 1, False), fill, "diag", "tok")

    def _pair(self, a: str, b: str, dst: str) -> tuple[torch.Tensor, ...]:
        """Arguments of :meth:`products` for the elementwise product ``dst += a * b``."""
        a_cols = self._cols(a)[:, None]
        return a_cols, torch.ones(a_cols.shape), self._cols(b)[:, None], self._cols(dst)

    def rope(self) -> None:
        """S.r = RoPE of the q and k parts of S.qkv (the cos/sin registers hold the token's position)."""
        dh, n = self.spec.head_dim, self.dq + self.dkv
        i = torch.arange(n)
        j, half = i % dh, dh // 2
        first = j < half  # rotate_half(x)_j = -x_{j+half} for j < half, x_{j-half} otherwise
        partner = torch.where(first, i + half, i - half)
        qkv = self._cols("S.qkv")
        a = torch.stack((qkv[i], qkv[partner]), 1)
        a_scale = torch.stack((torch.ones(n), torch.where(first, -1.0, 1.0)), 1)
        b = torch.stack((self._cols("cos")[j], self._cols("sin")[j]), 1)
        self.products(("rope",), a, a_scale, b, self._cols("S.r"))

    def _prologue(self, T: int) -> None:
        """Also write cos/sin of each token's position: a diagonal head with value = tables^T onehot(t)."""
        super()._prologue(T)
        dh = self.spec.head_dim
        table = None
        if self.device is None or torch.device(self.device).type != "meta":
            cos, sin = rope_tables(self.spec, torch.arange(T), self.dtype)
            table = torch.cat((cos, sin), 1).T.flatten()  # (2 dh) x T, row-major
        rows = torch.arange(2 * dh).repeat_interleave(T)
        cols = self._cols("pos").repeat(2 * dh)

        def fill(mod) -> None:
            P = self.patterns
            P.read(mod.q.weight, [self._t("one")])
            P.read(mod.k.weight, [self._t("one")])
            P.entries(mod.v.weight, rows, cols, table)
            P.write(mod.o.weight, [self._t("cos"), self._t("sin", off=dh)])
        self._op(("rope_tables",), self._attn(1, 1, 2 * dh, False), fill, "diag", "tok")

    # ------------------------------------------------------------------ program
    def block_forward(self, layer: int, ns: str) -> None:
        """One Llama block; ``ns`` names the registers keeping its activations ("S": scratch, cleared)."""
        s, T = self.spec, self.config.max_len
        D, Fd, Dq, Dkv, H, dh = s.d_model, s.d_ff, self.dq, self.dkv, s.n_heads, s.head_dim
        rep, keep = s.n_heads // s.n_kv_heads, ns != "S"
        if keep:
            self.linmap([("x", f"{ns}.x", 1.0)])
        self.norm([self._t("x")], f"{ns}.n1")
        self.lin_forward(f"{layer}.ln1", f"{ns}.n1", f"{ns}.u1", D, D)
        self.lin_forward(f"{layer}.qkv", f"{ns}.u1", "S.qkv", D, Dq + 2 * Dkv)
        self.rope()
        dv = dh + (T if keep else 0)  # kept blocks also store each row of attention probabilities
        q = [self._t("S.r", scale=s.attn_scale, start=h * dh, n=dh, off=h * dh) for h in range(H)]
        k = [self._t("S.r", start=Dq + h // rep * dh, n=dh, off=h * dh) for h in range(H)]
        v = [self._t("S.qkv", start=Dq + Dkv + h // rep * dh, n=dh, off=h * dv) for h in range(H)]
        o = [self._t(f"{ns}.o", start=h * dh, n=dh, off=h * dv) for h in range(H)]
        if keep:
            v += [self._t("pos", off=h * dv + dh) for h in range(H)]
            o += [self._t(f"{ns}.A", start=h * T, n=T, off=h * dv + dh) for h in range(H)]
        self._op(("attn", ns), self._attn(H, dh, dv, True), self._fill(q, k, v, o), "causal", "tok")
        self.lin_forward(f"{layer}.o", f"{ns}.o", "x", Dq, D)
        if keep:
            self.linmap([("x", f"{ns}.x2", 1.0)])
        self.norm([self._t("x")], f"{ns}.n2")
        self.lin_forward(f"{layer}.ln2", f"{ns}.n2", f"{ns}.u2", D, D)
        self.lin_forward(f"{layer}.gu", f"{ns}.u2", f"{ns}.h", D, 2 * Fd)
        self.act([self._t(f"{ns}.g")], f"{ns}.s")
        self.products(("swiglu", ns), *self._pair(f"{ns}.s", f"{ns}.up", f"{ns}.a"))
        self.lin_forward(f"{layer}.down", f"{ns}.a", "x", Fd, D)
        self.clear(["S.qkv", "S.r"] + ([] if keep else [f"S.{r}" for r in self.SCRATCH]))

    def mlp_backward(self, layer: int, ns: str) -> None:
        """Backward and update of the SwiGLU MLP; leaves d loss / d (MLP input) in du2."""
        D, Fd, N = self.spec.d_model, self.spec.d_ff, self.config.fd_scale
        self.lin_backward(f"{layer}.down", "g", "da", Fd, D)
        self.lin_update(f"{layer}.down", "g", f"{ns}.a", Fd, D, self.has_bias(layer, "down"))
        # d up = da * silu(g), d silu(g) = da * up
        pairs = [self._pair("da", f"{ns}.s", "dup"), self._pair("da", f"{ns}.up", "ds")]
        self.products(("swigluT", ns), *(torch.cat(parts) for parts in zip(*pairs, strict=True)))
        self.act([self._t(f"{ns}.g"), self._t("ds", scale=1.0 / N)], "dg", scale=N)
        self.linmap([(f"{ns}.s", "dg", -N)])
        self.lin_backward(f"{layer}.gu", "dh", "du2", D, 2 * Fd)
        self.lin_update(f"{layer}.gu", "dh", f"{ns}.u2", D, 2 * Fd, self.has_bias(layer, "gu"))

    # ------------------------------------------------------------------ inputs
    def _prefix_entries(self):
        s = self.spec
        for layer, b in enumerate(s.blocks):
            yield f"{layer}.ln1", torch.diag(b["ln1.w"]), b.get("ln1.b")
            for group in ("qkv", "o", "gu", "down"):
                names = self.MEMBERS[group]
                bias = torch.cat([b[f"{n}.b"] for n in names]) if self.has_bias(layer, group) else None
                yield f"{layer}.{group}", torch.cat([b[f"{n}.w"] for n in names]), bias
            yield f"{layer}.ln2", torch.diag(b["ln2.w"]), b.get("ln2.b")
        yield "lnf", torch.diag(s.ln_f["w"]), s.ln_f.get("b")
