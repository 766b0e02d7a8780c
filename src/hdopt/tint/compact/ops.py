"""Building the compact TinT's program: modules keyed by their fixed pattern, and the gadgets made of them.

:class:`GadgetBuilder` is the base of :class:`hdopt.tint.compact.program.CompactTinT`: each method appends one
module application (a module and its :class:`~hdopt.tint.compact.executor.Site`) to the program, building
the module only the first time its pattern is seen. Terms are ``(state coordinate, length, scale, offset in
the module's vector)`` (:data:`hdopt.tint.gadgets.Term`); ``_t`` names token registers, ``_m`` memory
registers and ``_slot`` the packed slots of a prefix group.

* ``attention`` (any q/k/v/o terms), ``copy``/``clear`` (one linear head per row pair, score exactly 1),
  ``norm`` (LayerNorm/RMSNorm without gain), ``act`` (the auxiliary's activation, one MLP chunk wide);
* ``lin_forward`` / ``lin_backward`` / ``lin_update``: a packed linear map, its transpose and its SGD step
  against the group's prefix rows (:mod:`hdopt.tint.compact.prefix`);
* ``store`` / ``restore`` / ``forget``: copies between the token rows and a memory block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hdopt.tint.compact.executor import Site
from hdopt.tint.compact.modules import TransposedAttention
from hdopt.tint.gadgets import MLP, Attention, Term


class GadgetBuilder(nn.Module):
    """Program-building helpers; the subclass provides the layouts (``tok``, ``mem``, ``pre``), ``width``,
    ``spec``, ``config``, ``device``, ``dtype``, ``patterns``, ``NORM`` and the program lists."""

    # ------------------------------------------------------------------ terms
    def _t(self, name: str, scale: float = 1.0, off: int = 0, start: int = 0, n: int | None = None) -> Term:
        s, length = self.tok[name]
        return (s + start, length - start if n is None else n, scale, off)

    def _m(self, name: str, scale: float = 1.0, off: int = 0) -> Term:
        s, length = self.mem[name]
        return (s, length, scale, off)

    # ------------------------------------------------------------------ modules, keyed by their pattern
    def _op(self, key: tuple, make: Callable[[], nn.Module], fill: Callable[[nn.Module], None],
            site: Site) -> None:
        """Append an application; modules with the same fixed pattern ``key`` are built once."""
        if key not in self._keys:
            module = make()
            with torch.no_grad():
                fill(module)
            self._keys[key] = len(self.ops)
            self.ops.append(module)
        numel = sum(p.numel() for p in self.ops[self._keys[key]].parameters())
        self._unshared += numel
        self._scoped[(self._scope, key)] = numel
        self.program.append((self._keys[key], site))

    def attention(self, site: Site, heads: int, dqk: int, dv: int, q: list, k: list, v: list, o: list,
                  softmax: bool = False, cls: type[Attention] = Attention) -> None:
        """An attention module: q/k/v weights read the ``q``/``k``/``v`` terms, the output writes ``o``."""
        def make() -> nn.Module:
            if cls is TransposedAttention:
                return cls(self.width, heads, dqk, dv, self.device, self.dtype)
            return cls(self.width, heads, dqk, dv, softmax, self.device, self.dtype)

        def fill(m: nn.Module) -> None:
            P = self.patterns
            P.read(m.q.weight, q)
            P.read(m.k.weight, k)
            P.read(m.v.weight, v)
            P.write(m.o.weight, o)
        key = (cls.__name__, heads, dqk, dv, softmax, tuple(q), tuple(k), tuple(v), tuple(o))
        self._op(key, make, fill, site)

    def copy(self, pairs: list[tuple[Term, Term]], rows: str = "tok", keys: str = "tok") -> None:
        """For each (src at the key rows, dst at the query rows): dst += src, row i from row i (exact)."""
        n = sum(src[1] for src, _ in pairs)
        v, o, off = [], [], 0
        for (s0, length, scale, _), (d0, _, dscale, _) in pairs:
            v.append((s0, length, scale, off))
            o.append((d0, length, dscale, off))
            off += length
        one = [(0, 1, 1.0, 0)]  # "one" is coordinate 0 of token and memory rows
        self.attention(Site(rows, keys, "pair"), 1, 1, n, one, one, v, o)

    def clear(self, names: list[str]) -> None:
        self.copy([(self._t(r), self._t(r, scale=-1.0)) for r in names])

    def norm(self, terms: list[Term], dst: str, scale: float = 1.0) -> None:
        """dst += scale * normalize(sum of terms) (LayerNorm / RMSNorm without gain, D wide)."""
        D, write = self.spec.d_model, [self._t(dst, scale=scale)]

        def fill(m: nn.Module) -> None:
            self.patterns.read(m.read.weight, terms)
            self.patterns.write(m.write.weight, write)
        self._op((self.NORM.__name__, tuple(terms), tuple(write)),
                 lambda: self.NORM(self.width, D, self.spec.norm_eps, self.device, self.dtype), fill,
                 Site("tok"))

    def act(self, terms: list[Term], dst: str, scale: float = 1.0) -> None:
        """dst += scale * f(sum of terms) elementwise (one MLP chunk wide)."""
        write = [self._t(dst, scale=scale)]

        def fill(m: nn.Module) -> None:
            self.patterns.read(m.fc.weight, terms)
            self.patterns.write(m.proj.weight, write)
        act = self.spec.activation
        self._op(("act", act, tuple(terms), tuple(write)),
                 lambda: MLP(self.width, self.chunk, act, self.device, self.dtype), fill, Site("tok"))

    # ------------------------------------------------------------------ linear maps against prefix groups
    def _slot(self, group: str, s: int, n: int, scale: float = 1.0, off: int = 0, start: int = 0) -> Term:
        return (self.pre.slot(self.pre.groups[group], s) + start, n, scale, off)

    def _rows_of(self, group: str, s: int) -> int:
        """Valid weight rows in slot s (the last slot of a group may be partly empty)."""
        g = self.pre.groups[group]
        return max(0, min(g.rows, g.d_out - s * g.rows))

    def lin_forward(self, group: str, src: str, dst: str) -> None:
        """dst += W src + b, the group's weights in its prefix rows."""
        g = self.pre.groups[group]
        S, K, d_in = g.slots, g.rows, g.d_in
        q = [t for s in range(S) for t in (self._t(src, n=d_in, off=s * (d_in + 1)),
                                           self._t("one", off=s * (d_in + 1) + d_in))]
        k = [self._slot(group, s, d_in + 1, off=s * (d_in + 1)) for s in range(S)]
        e = [(0, K, 1.0, s * K) for s in range(S)]
        o = [self._t(dst, start=s * K, n=self._rows_of(group, s), off=s * K) for s in range(S)
             if self._rows_of(group, s)]
        self.attention(Site("tok", f"grp:{group}", "full"), S, d_in + 1, K, q, k, e, o)

    def lin_backward(self, group: str, grad: str, dst: str) -> None:
        """dst += W^T grad."""
        g = self.pre.groups[group]
        S, K, d_in = g.slots, g.rows, g.d_in
        q = [self._t(grad, start=s * K, n=self._rows_of(group, s), off=s * K) for s in range(S)
             if self._rows_of(group, s)]
        e = [(0, K, 1.0, s * K) for s in range(S)]
        v = [self._slot(group, s, d_in, off=s * d_in) for s in range(S)]
        o = [self._t(dst, n=d_in, off=s * d_in) for s in range(S)]
        self.attention(Site("tok", f"grp:{group}", "full"), S, K, d_in, q, e, v, o)

    def lin_update(self, group: str, grad: str, src: str | None, bias: bool) -> None:
        """SGD step on the group's rows: w_r -= lr * sum_t grad_t[r] src_t (src None: bias only), and
        b_r -= lr * sum_t grad_t[r] when ``bias``."""
        g, lr = self.pre.groups[group], self.config.inner_lr
        S, K, d_in = g.slots, g.rows, g.d_in
        w_in = 0 if src is None else d_in
        dv = w_in + int(bias)
        e = [(0, K, 1.0, s * K) for s in range(S)]
        k = [self._t(grad, start=s * K, n=self._rows_of(group, s), off=s * K) for s in range(S)
             if self._rows_of(group, s)]
        v, o = [], []
        for s in range(S):
            if src is not None:
                v.append(self._t(src, n=d_in, off=s * dv))
                o.append(self._slot(group, s, d_in, scale=-lr, off=s * dv))
            if bias:
                v.append(self._t("one", off=s * dv + w_in))
                o.append(self._slot(group, s, 1, scale=-lr, off=s * dv + w_in, start=d_in))
        self.attention(Site(f"grp:{group}", "tok", "full"), S, K, dv, e, k, v, o)

    def has_bias(self, kind: str) -> bool:
        """Whether the auxiliary's maps of this kind have biases (the same in every block)."""
        names = {"ln": ("ln1", "ln2"), "qk": ("q", "k"), "v": ("v",), "o": ("o",), "fc": ("fc",),
                 "proj": ("proj",), "gu": ("gate", "up"), "down": ("down",)}[kind]
        present = {f"{n}.b" in b for b in self.spec.blocks for n in names}
        if len(present) > 1:
            raise NotImplementedError(f"maps of kind {kind!r} have biases in some blocks or members only")
        return present.pop()

    # ------------------------------------------------------------------ memory rows
    def store(self, i: int) -> None:
        """Memory block i keeps x (the input of simulated layer first + i)."""
        self.copy([(self._t("x"), self._m("xin"))], rows=f"mem{i}", keys="tok")

    def restore(self, i: int) -> None:
        self.copy([(self._m("xin"), self._t("x"))], rows="tok", keys=f"mem{i}")

    def forget(self, i: int) -> None:
        self.copy([(self._m("xin"), self._m("xin", scale=-1.0))], rows=f"mem{i}", keys=f"mem{i}")

