"""The explicit TinT: a real transformer whose prefix tokens hold the auxiliary's weights.

State. ``X`` (B, P + T, W): P prefix rows, then the T input tokens. A prefix row holds one output row of one
auxiliary linear map (:class:`~hdopt.tint.explicit_layout.Group`): register ``Pre.W`` = [weight row, bias],
``Pre.E`` = one-hot of its index in the group. Norm gains are the diagonal map ``diag(gamma)``; the
vocabulary rows hold the output embeddings. Token rows keep the auxiliary's activations in typed registers
(:mod:`hdopt.tint.explicit_layout`): :class:`Reg` once, :class:`At` per block (a scratch copy for blocks that
only run forward, a kept copy per simulated block).

Program. A list of residual modules from :mod:`hdopt.tint.gadgets`, each applied with a
:class:`~hdopt.tint.explicit_layout.Route` (hard row gate + hard attention mask). Each module is described as
data (an ``*Pattern``: module shape + fixed weights); equal patterns are built once and shared, so the count
"blocks reused" is exact by construction. The gadgets (methods below):

* linear ``y = W x + b`` (:meth:`lin_forward`): a linear-attention head (no softmax) from tokens to the
  map's rows, ``q = [x, 1]``, ``k_j = [w_j, b_j]``, ``v_j = e_j``; backward ``W^T dy`` (:meth:`lin_backward`):
  ``q = dy``, ``k_j = e_j``, ``v_j = w_j``; SGD update (:meth:`lin_update`): the rows attend to the tokens,
  ``q_j = e_j``, ``k_t = dy_t``, ``v_t = [x_t, 1]``, scale ``-lr`` (the bias step is exactly
  ``-lr * sum_t dy_t``: no x4 defect);
* attention: softmax heads reproduce the auxiliary's heads and store each probability row (values = one-hot
  positions); the detached-probability backward ``dv_t = sum_s P[s, t] do_s`` is a linear head;
* norms and activations (:meth:`norm`, :meth:`act`): real LayerNorm/RMSNorm and MLP modules; their backward
  is the reference rule's ``N [f(x + g/N) - f(x)]``;
* copies, clears, subtractions (:meth:`linmap`): a ReLU MLP with ``[P; -P]`` weights (exact);
* loss gradient (:meth:`loss_gradient`): softmax over the vocabulary rows gives ``E^T softmax(E u)``; the next
  token's embedding arrives by a shift head; the loss weight multiplies through a diagonal head.

Program order (:meth:`_build_program`): prologue; every block forward (simulated ones keep activations);
``n_steps`` x (loss gradient, simulated blocks backward + update, top to bottom; later steps first rerun
the simulated blocks); the updated model's forward; the final norm. Families differ only by hooks: layout
(:meth:`_layer_groups`, :meth:`_widths`, ``TOKENS``/``ACTS``/``BACKWARD``/``TRANSIENT``), :meth:`_prologue`,
:meth:`attention_qk` (RoPE), :meth:`mlp_forward` and :meth:`mlp_backward`; the Llama family lives in
:mod:`hdopt.tint.explicit_llama`. The structured realization computes the same numbers without the zeros.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from hdopt.tint.aux import AuxSpec
from hdopt.tint.config import TinTConfig
from hdopt.tint.explicit_layout import (
    MEMBERS,
    NORMS,
    Act,
    At,
    Group,
    Keys,
    Map,
    Pre,
    Reg,
    Register,
    Route,
    route_masks,
)
from hdopt.tint.gadgets import (
    AttentionPattern,
    MLPPattern,
    Norm,
    NormPattern,
    Pattern,
    Patterns,
    Registers,
    Term,
)
from hdopt.tint.structured import TinTOutput


def explicit_tint(spec: AuxSpec, config: TinTConfig, device=None) -> ExplicitTinT:
    """The explicit TinT of ``spec``'s family (:class:`ExplicitTinT` or its Llama-family subclass)."""
    if spec.family == "llama":
        from hdopt.tint.explicit_llama import ExplicitLlamaTinT

        return ExplicitLlamaTinT(spec, config, device)
    return ExplicitTinT(spec, config, device)


class ExplicitTinT(nn.Module):
    """TinT with explicit fixed-pattern weights (GPT-2/OPT auxiliaries, ``backward='reference'``).

    Build on ``device="meta"`` to count parameters of large configurations without allocating them.
    Another family subclasses it and overrides the class attributes and hooks named in the module docstring.
    """

    FAMILY = "gpt2"
    NORM: type[Norm] = Norm
    # token registers, in layout order: inputs and work space, the scratch activations, backward, loss
    TOKENS: tuple[Register, ...] = (Reg.POS, Reg.ONE, Reg.C, Reg.TOK, Reg.EMB, Reg.TGT, Reg.X, Reg.G,
                                    At(Act.QKV))
    ACTS = (Act.N1, Act.U1, Act.O, Act.N2, Act.U2, Act.H, Act.A)  # a block's activations (scratch and kept)
    BACKWARD = (Reg.DA, Reg.DH, Reg.DU2, Reg.DN2, Reg.DO, Reg.DQKV, Reg.DU1, Reg.DN1)
    LOSS = (Reg.NF, Reg.UF, Reg.PE, Reg.DUF, Reg.DNF)
    TRANSIENT: tuple[Register, ...] = (At(Act.QKV),)  # used inside one block's forward only

    def __init__(self, spec: AuxSpec, config: TinTConfig, device=None):
        super().__init__()
        if spec.family != self.FAMILY:
            raise ValueError(f"{type(self).__name__} is for {self.FAMILY!r} auxiliaries, got {spec.family!r} "
                             "(use hdopt.tint.explicit.explicit_tint)")
        if config.backward != "reference" or config.n_layers > spec.n_layers:
            raise ValueError("explicit TinT needs backward='reference' and n_layers <= the auxiliary's "
                             "number of blocks")
        self.spec, self.config = spec, config
        self.device, self.dtype = device, spec.dtype
        self.first = spec.n_layers - config.n_layers  # the lowest simulated block
        self.tops = list(range(self.first, spec.n_layers))
        self._layout_prefix()
        self._layout_tokens()
        self.width = max(self.pre.width, self.tok.width)
        self.bias_slot = self.pre[Pre.W][1] - 1  # index of the bias inside register W
        self.patterns = Patterns()  # fills the modules' weights and counts their non-zeros
        self.ops = nn.ModuleList()  # one module per distinct pattern
        self._shared: dict[Pattern, int] = {}  # pattern -> index in ops
        self.program: list[tuple[int, Route]] = []  # (index in ops, route) per module application
        self.readouts: set[int] = set()  # program positions before which the inner loss is read out
        self._unshared = 0  # parameters counted once per application (the size without reuse)
        self._build_program()
        self.register_buffer("prefix", self._encode_prefix(), persistent=False)

    # ------------------------------------------------------------------ layout
    @property
    def dq(self) -> int:
        """Width of all query heads."""
        return self.spec.n_heads * self.spec.head_dim

    @property
    def dkv(self) -> int:
        """Width of all key (or value) heads."""
        return self.spec.n_kv_heads * self.spec.head_dim

    @property
    def kept(self) -> tuple[Act, ...]:
        """Activations each simulated block keeps for its backward pass."""
        return (Act.X, Act.X2, Act.PROBS, *self.ACTS)

    def _layer_groups(self) -> list[tuple[Map, int, int]]:
        """(map, rows = output width, input width) of each linear map of one block, in prefix order."""
        D, Fd = self.spec.d_model, self.spec.d_ff
        return [(Map.LN1, D, D), (Map.QKV, self.dq + 2 * self.dkv, D), (Map.O, D, self.dq), (Map.LN2, D, D),
                (Map.FC, Fd, D), (Map.PROJ, D, Fd)]

    def _widths(self) -> dict[Reg | Act, int]:
        """Widths of the token registers that are not D wide."""
        s, Fd, T = self.spec, self.spec.d_ff, self.config.max_len
        return {Reg.POS: T, Reg.ONE: 1, Reg.C: 1, Act.PROBS: s.n_heads * T, Act.QKV: self.dq + 2 * self.dkv,
                Act.O: self.dq, Act.H: Fd, Act.A: Fd, Reg.DA: Fd, Reg.DH: Fd, Reg.DO: self.dq,
                Reg.DQKV: self.dq + 2 * self.dkv}

    def _layout_prefix(self) -> None:
        s, D = self.spec, self.spec.d_model
        groups = self._layer_groups()
        self.pre: Registers[Pre] = Registers()
        self.pre.add(Pre.W, max(d_in for _, _, d_in in groups) + 1)  # [weight row, bias]
        self.pre.add(Pre.E, max(n for _, n, _ in groups))  # one-hot of the row inside its group
        self.groups: dict[Group, tuple[int, int]] = {}  # group -> (first prefix row, rows)
        rows = 0
        for layer in range(s.n_layers):
            for m, n, _ in groups:
                self.groups[Group(m, layer)] = (rows, n)
                rows += n
        for m, n in ((Map.LNF, D), (Map.VOCAB, s.vocab_size)):
            self.groups[Group(m)] = (rows, n)
            rows += n
        self.n_prefix = rows

    def _layout_tokens(self) -> None:
        widths, D = self._widths(), self.spec.d_model
        self.tok: Registers[Register] = Registers()
        for reg in self.TOKENS:
            self.tok.add(reg, widths.get(reg.act if isinstance(reg, At) else reg, D))
        for act in self.ACTS:
            self.tok.add(At(act), widths.get(act, D))
        for reg in self.BACKWARD + self.LOSS:
            self.tok.add(reg, widths.get(reg, D))
        for layer in self.tops:  # activations kept for the backward pass of each simulated block
            for act in self.kept:
                self.tok.add(At(act, layer), widths.get(act, D))

    # ------------------------------------------------------------------ terms
    def _t(self, reg: Register, scale: float = 1.0, off: int = 0, start: int = 0,
           n: int | None = None) -> Term:
        """Coordinates ``start .. start + n`` of token register ``reg``, at ``off`` in a module vector."""
        s, length = self.tok[reg]
        return (s + start, length - start if n is None else n, scale, off)

    def _p(self, reg: Pre, scale: float = 1.0, off: int = 0, start: int = 0, n: int | None = None) -> Term:
        """The same for a prefix register."""
        s, length = self.pre[reg]
        return (s + start, length - start if n is None else n, scale, off)

    # ------------------------------------------------------------------ gadgets
    def _apply(self, pattern: Pattern, route: Route) -> None:
        """Append an application of ``pattern`` (built on first use, then shared) to the program."""
        if pattern not in self._shared:
            self._shared[pattern] = len(self.ops)
            self.ops.append(pattern.build(self.width, self.patterns, self.device, self.dtype))
        op = self._shared[pattern]
        self._unshared += sum(p.numel() for p in self.ops[op].parameters())
        self.program.append((op, route))

    def _linear_attention(self, heads: int, dqk: int, dv: int, q, k, v, o) -> AttentionPattern:
        return AttentionPattern(heads, dqk, dv, False, tuple(q), tuple(k), tuple(v), tuple(o))

    def lin_forward(self, group: Group, src: Register, dst: Register, d_in: int, d_out: int) -> None:
        """dst += W x + b with (W, b) in the group's prefix rows."""
        self._apply(self._linear_attention(
            1, d_in + 1, d_out,
            q=[self._t(src, n=d_in), self._t(Reg.ONE, off=d_in)],
            k=[self._p(Pre.W, n=d_in), self._p(Pre.W, start=self.bias_slot, n=1, off=d_in)],
            v=[self._p(Pre.E, n=d_out)], o=[self._t(dst, n=d_out)]), Route(keys=group))

    def lin_backward(self, group: Group, grad: Register, dst: Register, d_in: int, d_out: int) -> None:
        """dst += W^T dy."""
        self._apply(self._linear_attention(1, d_out, d_in, q=[self._t(grad, n=d_out)],
                                           k=[self._p(Pre.E, n=d_out)], v=[self._p(Pre.W, n=d_in)],
                                           o=[self._t(dst, n=d_in)]), Route(keys=group))

    def lin_update(self, group: Group, grad: Register, src: Register | None, d_in: int, d_out: int,
                   bias: bool = True) -> None:
        """w_j -= lr * sum_t dy_t[j] [x_t, 1] in the group's prefix rows (bias only when ``src`` is None;
        weight only when not ``bias``)."""
        lr = self.config.inner_lr
        v, o = [], []
        if bias:
            v.append(self._t(Reg.ONE, off=d_in))
            o.append(self._p(Pre.W, scale=-lr, start=self.bias_slot, n=1, off=d_in))
        if src is not None:
            v.append(self._t(src, n=d_in))
            o.append(self._p(Pre.W, scale=-lr, n=d_in))
        self._apply(self._linear_attention(1, d_out, d_in + 1, q=[self._p(Pre.E, n=d_out)],
                                           k=[self._t(grad, n=d_out)], v=v, o=o),
                    Route(rows=group, keys=Keys.TOKENS))

    def norm(self, terms: list[Term], dst: Register, scale: float = 1.0) -> None:
        """dst += scale * normalize(sum of terms) (LayerNorm or RMSNorm without gain, D wide)."""
        s = self.spec
        self._apply(NormPattern(self.NORM, s.d_model, s.norm_eps, tuple(terms), (self._t(dst, scale=scale),)),
                    Route())

    def act(self, terms: list[Term], dst: Register, scale: float = 1.0) -> None:
        """dst += scale * f(sum of terms) elementwise (d_ff wide)."""
        s = self.spec
        self._apply(MLPPattern(s.d_ff, s.activation, tuple(terms), (self._t(dst, scale=scale),)), Route())

    def linmap(self, pairs: list[tuple[Register, Register, float]]) -> None:
        """For each (src, dst, scale): dst += scale * src, exactly, by a ReLU MLP (relu(z) - relu(-z) = z)."""
        n = sum(self.tok[src][1] for src, _, _ in pairs)
        reads, writes, off = [], [], 0
        for src, dst, scale in pairs:
            reads += [self._t(src, off=off), self._t(src, scale=-1.0, off=n + off)]
            writes += [self._t(dst, scale=scale, off=off), self._t(dst, scale=-scale, off=n + off)]
            off += self.tok[src][1]
        self._apply(MLPPattern(2 * n, "relu", tuple(reads), tuple(writes)), Route())

    def clear(self, regs: list[Register]) -> None:
        self.linmap([(r, r, -1.0) for r in regs])

    def has_bias(self, layer: int, m: Map) -> bool:
        """Whether the auxiliary has the biases of map ``m`` of a block (then the update moves them)."""
        present = {f"{name}.b" in self.spec.blocks[layer] for name in MEMBERS[m]}
        if len(present) > 1:
            raise NotImplementedError(f"map {m.value} of block {layer} has biases on some members only")
        return present.pop()

    # ------------------------------------------------------------------ program
    def _prologue(self) -> None:
        """x = input embedding; tgt = the next token's output embedding."""
        T = self.config.max_len
        self.linmap([(Reg.EMB, Reg.X, 1.0)])
        # token t reads token t+1's output embedding: a shift head on one-hot positions
        self._apply(self._linear_attention(1, T, self.spec.d_model, q=[self._t(Reg.POS, n=T - 1, off=1)],
                                           k=[self._t(Reg.POS)], v=[self._t(Reg.TOK)], o=[self._t(Reg.TGT)]),
                    Route(keys=Keys.TOKENS))

    def _build_program(self) -> None:
        D = self.spec.d_model
        self._prologue()
        for layer in range(self.spec.n_layers):
            self.block_forward(layer, keep=layer >= self.first)
        for step in range(self.config.n_steps):
            if step > 0:  # restart the simulated blocks from the stored input of the lowest one
                stored = [At(act, i) for i in self.tops for act in self.kept]
                self.linmap([(At(Act.X, self.first), Reg.X, 1.0), (Reg.X, Reg.X, -1.0), (Reg.G, Reg.G, -1.0)]
                            + [(r, r, -1.0) for r in stored])
                for layer in self.tops:
                    self.block_forward(layer, keep=True)
            self.loss_gradient()
            for layer in reversed(self.tops):
                self.mlp_backward(layer)
                self.attention_backward(layer)
        self.linmap([(Reg.EMB, Reg.X, 1.0), (Reg.X, Reg.X, -1.0)])  # the updated model's forward afresh
        for layer in range(self.spec.n_layers):
            self.block_forward(layer, keep=False)
        self.norm([self._t(Reg.X)], Reg.NF)
        self.lin_forward(Group(Map.LNF), Reg.NF, Reg.UF, D, D)

    def block_forward(self, layer: int, keep: bool) -> None:
        """One block; ``keep``: its activations go to the registers of simulated block ``layer`` (else to the
        scratch copies, cleared at the end)."""
        s, T = self.spec, self.config.max_len
        D, Dq, Dkv, H, dh = s.d_model, self.dq, self.dkv, s.n_heads, s.head_dim
        rep = s.n_heads // s.n_kv_heads  # grouped-query attention: query head h reads kv head h // rep
        at, grp = partial(At, layer=layer if keep else None), partial(Group, layer=layer)
        qkv = At(Act.QKV)
        if keep:
            self.linmap([(Reg.X, at(Act.X), 1.0)])
        self.norm([self._t(Reg.X)], at(Act.N1))
        self.lin_forward(grp(Map.LN1), at(Act.N1), at(Act.U1), D, D)
        self.lin_forward(grp(Map.QKV), at(Act.U1), qkv, D, Dq + 2 * Dkv)
        qk = self.attention_qk()
        dv = dh + (T if keep else 0)  # kept blocks also store each row of attention probabilities
        q = [self._t(qk, scale=s.attn_scale, start=h * dh, n=dh, off=h * dh) for h in range(H)]
        k = [self._t(qk, start=Dq + h // rep * dh, n=dh, off=h * dh) for h in range(H)]
        v = [self._t(qkv, start=Dq + Dkv + h // rep * dh, n=dh, off=h * dv) for h in range(H)]
        o = [self._t(at(Act.O), start=h * dh, n=dh, off=h * dv) for h in range(H)]
        if keep:
            v += [self._t(Reg.POS, off=h * dv + dh) for h in range(H)]
            o += [self._t(at(Act.PROBS), start=h * T, n=T, off=h * dv + dh) for h in range(H)]
        self._apply(AttentionPattern(H, dh, dv, True, tuple(q), tuple(k), tuple(v), tuple(o)),
                    Route(keys=Keys.CAUSAL))
        self.lin_forward(grp(Map.O), at(Act.O), Reg.X, Dq, D)
        if keep:
            self.linmap([(Reg.X, at(Act.X2), 1.0)])
        self.norm([self._t(Reg.X)], at(Act.N2))
        self.lin_forward(grp(Map.LN2), at(Act.N2), at(Act.U2), D, D)
        self.mlp_forward(layer, keep)
        self.clear([*self.TRANSIENT, *([] if keep else [At(act) for act in self.ACTS])])

    def attention_qk(self) -> Register:
        """Hook: the register whose q | k parts the attention heads read (GPT-2/OPT: the q|k|v projection)."""
        return At(Act.QKV)

    def mlp_forward(self, layer: int, keep: bool) -> None:
        """Hook: x += MLP(u2). GPT-2/OPT: h = fc(u2), a = f(h), x += proj(a)."""
        D, Fd = self.spec.d_model, self.spec.d_ff
        at, grp = partial(At, layer=layer if keep else None), partial(Group, layer=layer)
        self.lin_forward(grp(Map.FC), at(Act.U2), at(Act.H), D, Fd)
        self.act([self._t(at(Act.H))], at(Act.A))
        self.lin_forward(grp(Map.PROJ), at(Act.A), Reg.X, Fd, D)

    def loss_gradient(self) -> None:
        """g = d loss / d x at the last block's output: c_t (E^T softmax(E u_t) - e_{t+1}) through ln_f."""
        D, N = self.spec.d_model, self.config.fd_scale
        self.norm([self._t(Reg.X)], Reg.NF)
        self.lin_forward(Group(Map.LNF), Reg.NF, Reg.UF, D, D)
        self.readouts.add(len(self.program))  # read out the inner loss here (not part of the construction)
        vocab = AttentionPattern(1, D, D, True, q=(self._t(Reg.UF),), k=(self._p(Pre.W, n=D),),
                                 v=(self._p(Pre.W, n=D),), o=(self._t(Reg.PE),))
        self._apply(vocab, Route(keys=Group(Map.VOCAB)))
        self._apply(self._linear_attention(1, 1, D, q=[self._t(Reg.C)], k=[self._t(Reg.ONE)],
                                           v=[self._t(Reg.PE), self._t(Reg.TGT, scale=-1.0)],
                                           o=[self._t(Reg.DUF)]), Route(keys=Keys.SELF))
        self.lin_backward(Group(Map.LNF), Reg.DUF, Reg.DNF, D, D)
        self.norm([self._t(Reg.X), self._t(Reg.DNF, scale=1.0 / N)], Reg.G, scale=N)
        self.linmap([(Reg.NF, Reg.G, -N)])
        self.clear(list(self.LOSS))

    def mlp_backward(self, layer: int) -> None:
        """Hook: backward and update of simulated block ``layer``'s MLP, from g (d loss / d block output) to
        du2 (d loss / d MLP input). GPT-2/OPT: through proj, the activation (finite difference) and fc."""
        D, Fd, N = self.spec.d_model, self.spec.d_ff, self.config.fd_scale
        at, grp = partial(At, layer=layer), partial(Group, layer=layer)
        self.lin_backward(grp(Map.PROJ), Reg.G, Reg.DA, Fd, D)
        self.lin_update(grp(Map.PROJ), Reg.G, at(Act.A), Fd, D, self.has_bias(layer, Map.PROJ))
        self.act([self._t(at(Act.H)), self._t(Reg.DA, scale=1.0 / N)], Reg.DH, scale=N)
        self.linmap([(at(Act.A), Reg.DH, -N)])
        self.lin_backward(grp(Map.FC), Reg.DH, Reg.DU2, D, Fd)
        self.lin_update(grp(Map.FC), Reg.DH, at(Act.U2), D, Fd, self.has_bias(layer, Map.FC))

    def attention_backward(self, layer: int) -> None:
        """From du2 (d loss / d MLP input) down through ln2, the attention sublayer and ln1 into g.

        Shared by both families: query heads of a key/value group (GQA; one head per group for GPT-2/OPT)
        add into the same dv coordinates."""
        s, T, N = self.spec, self.config.max_len, self.config.fd_scale
        D, Dq, Dkv, H, dh = s.d_model, self.dq, self.dkv, s.n_heads, s.head_dim
        rep = s.n_heads // s.n_kv_heads
        at, grp = partial(At, layer=layer), partial(Group, layer=layer)
        self.lin_backward(grp(Map.LN2), Reg.DU2, Reg.DN2, D, D)
        if self.has_bias(layer, Map.LN2):
            self.lin_update(grp(Map.LN2), Reg.DU2, None, D, D)
        self.norm([self._t(at(Act.X2)), self._t(Reg.DN2, scale=1.0 / N)], Reg.G, scale=N)
        self.linmap([(at(Act.N2), Reg.G, -N)])
        self.lin_backward(grp(Map.O), Reg.G, Reg.DO, Dq, D)
        self.lin_update(grp(Map.O), Reg.G, at(Act.O), Dq, D, self.has_bias(layer, Map.O))
        # dv_t = sum over the group's query heads h of sum_s P_h[s, t] do_s (probabilities detached)
        self._apply(self._linear_attention(
            H, T, dh, q=[self._t(Reg.POS, off=h * T) for h in range(H)],
            k=[self._t(at(Act.PROBS), start=h * T, n=T, off=h * T) for h in range(H)],
            v=[self._t(Reg.DO, start=h * dh, n=dh, off=h * dh) for h in range(H)],
            o=[self._t(Reg.DQKV, start=Dq + Dkv + h // rep * dh, n=dh, off=h * dh) for h in range(H)]),
            Route(keys=Keys.TOKENS))
        self.lin_backward(grp(Map.QKV), Reg.DQKV, Reg.DU1, D, Dq + 2 * Dkv)
        self.lin_update(grp(Map.QKV), Reg.DQKV, at(Act.U1), D, Dq + 2 * Dkv, self.has_bias(layer, Map.QKV))
        self.lin_backward(grp(Map.LN1), Reg.DU1, Reg.DN1, D, D)
        if self.has_bias(layer, Map.LN1):
            self.lin_update(grp(Map.LN1), Reg.DU1, None, D, D)
        self.norm([self._t(at(Act.X)), self._t(Reg.DN1, scale=1.0 / N)], Reg.G, scale=N)
        self.linmap([(at(Act.N1), Reg.G, -N)])
        self.clear(list(self.BACKWARD))

    # ------------------------------------------------------------------ inputs and running
    def _encode_prefix(self) -> torch.Tensor:
        """(P, W) prefix rows: [weight row, bias] in W and the row's one-hot in E (zeros on meta)."""
        s, D = self.spec, self.spec.d_model
        X = torch.zeros(self.n_prefix, self.width, dtype=self.dtype, device=self.device)
        if X.device.type == "meta":
            return X
        w0, e0 = self.pre[Pre.W][0], self.pre[Pre.E][0]
        entries = [(Group(m, layer), *self._map_weights(layer, m))
                   for layer in range(s.n_layers) for m, _, _ in self._layer_groups()]
        entries.append((Group(Map.LNF), torch.diag(s.ln_f["w"]), s.ln_f.get("b")))
        for group, weight, bias in entries:
            start, n = self.groups[group]
            X[start:start + n, w0:w0 + weight.shape[1]] = weight
            if bias is not None:
                X[start:start + n, w0 + self.bias_slot] = bias
            X[start + torch.arange(n), e0 + torch.arange(n)] = 1.0
        start, n = self.groups[Group(Map.VOCAB)]
        X[start:start + n, w0:w0 + D] = s.lm_head
        return X

    def _map_weights(self, layer: int, m: Map) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight (rows, in), bias (rows,) or None) of map ``m`` of a block: its members' rows stacked."""
        b, names = self.spec.blocks[layer], MEMBERS[m]
        weight = torch.diag(b[f"{m.value}.w"]) if m in NORMS else torch.cat([b[f"{n}.w"] for n in names])
        bias = torch.cat([b[f"{n}.b"] for n in names]) if self.has_bias(layer, m) else None
        return weight, bias

    def _encode_tokens(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(B, T, W) token rows; ``weights`` (B, T) is each position's loss weight (for predicting t+1)."""
        s, (B, T) = self.spec, ids.shape
        X = torch.zeros(B, T, self.width, dtype=self.dtype)
        pos0, one, c = self.tok[Reg.POS][0], self.tok[Reg.ONE][0], self.tok[Reg.C][0]
        tok0, emb0, D = self.tok[Reg.TOK][0], self.tok[Reg.EMB][0], s.d_model
        X[:, torch.arange(T), pos0 + torch.arange(T)] = 1.0
        X[..., one], X[..., c] = 1.0, weights
        X[..., tok0:tok0 + D] = s.lm_head[ids]
        X[..., emb0:emb0 + D] = s.wte[ids]
        if s.wpe is not None:
            X[..., emb0:emb0 + D] += s.wpe[torch.arange(T) + s.pos_offset]
        return X

    def _mask(self, route: Route, T: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(attention mask (N, N) bool or None, row gate (N, 1)) of a route for T input tokens."""
        return route_masks(route, self.groups, self.n_prefix, T, self.dtype)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, context_len: int, targets: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> TinTOutput:
        """Same contract as :meth:`StructuredTinT.forward` (no padding: ``attention_mask`` must be None)."""
        if attention_mask is not None:
            raise ValueError("the explicit TinT takes unpadded batches (attention_mask=None)")
        B, T = input_ids.shape
        if self.config.max_len < T or not 1 <= context_len <= T:
            raise ValueError(f"need T <= max_len={self.config.max_len} and 1 <= context_len <= T")
        if targets is None:
            targets = torch.ones_like(input_ids, dtype=torch.bool)
        targets = targets.clone()
        targets[:, 0], targets[:, context_len:] = False, False
        w = targets[:, 1:].to(self.dtype)  # weight of position t = target t+1
        if self.config.reduction == "mean":
            w = w / w.sum(1, keepdim=True).clamp_min(1)
        weights = torch.cat((w, torch.zeros(B, 1, dtype=self.dtype)), 1)
        X = torch.cat((self.prefix.expand(B, -1, -1), self._encode_tokens(input_ids, weights)), 1)
        masks = {route: self._mask(route, T) for route in dict.fromkeys(r for _, r in self.program)}
        P, losses = self.n_prefix, []
        for i, (op, route) in enumerate(self.program):
            if i in self.readouts:
                losses.append(self._loss(X[:, P:], input_ids, w))
            X = self.ops[op](X, *masks[route])
        uf0, D = self.tok[Reg.UF][0], self.spec.d_model
        logits = X[:, P + context_len - 1:, uf0:uf0 + D] @ self.spec.lm_head.mT
        inner = torch.stack(losses) if losses else torch.zeros(0, B, dtype=self.dtype)
        return TinTOutput(query_logits=logits, inner_losses=inner, blocks=[])

    def _loss(self, tokens: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        uf0, D = self.tok[Reg.UF][0], self.spec.d_model
        logp = torch.log_softmax(tokens[:, :-1, uf0:uf0 + D] @ self.spec.lm_head.mT, -1)
        return -(logp.gather(-1, ids[:, 1:, None]).squeeze(-1) * w).sum(1)

    # ------------------------------------------------------------------ size
    def num_parameters(self, reuse: bool = True) -> int:
        """Fixed-pattern module weights (shared modules once when ``reuse``) + the token/position embeddings.

        The prefix rows (the auxiliary's weights, P x W values) are the input, not parameters; see
        :meth:`size_report` for every count.
        """
        modules = sum(p.numel() for p in self.ops.parameters()) if reuse else self._unshared
        return modules + self._embedding_params()

    def _embedding_params(self) -> int:
        s = self.spec
        return s.wte.numel() + (0 if s.wpe is None else s.wpe.numel())

    def size_report(self) -> dict:
        return {"width": self.width, "prefix_rows": self.n_prefix, "modules": len(self.ops),
                "module_applications": len(self.program), "params_reused": self.num_parameters(True),
                "params_no_reuse": self.num_parameters(False),
                "nonzero_pattern_weights": self.patterns.nonzeros, "embeddings": self._embedding_params()}
