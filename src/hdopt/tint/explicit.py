"""The explicit TinT: a real transformer whose prefix tokens hold the auxiliary's weights.

Rows of the state ``X`` (B, P + T, W) are P prefix tokens then T input tokens. A prefix token holds one output
row of one auxiliary linear map (register ``w`` = [weight row, ..., bias], register ``e`` = one-hot of its row
index); LayerNorm gains are the diagonal linear map ``diag(gamma)`` with bias ``beta``; the vocabulary rows
hold the (tied) output embeddings. Input tokens hold the auxiliary's activations in named registers.

The program (a list of residual modules from :mod:`hdopt.tint.gadgets`, each with a hard attention mask and a
hard row gate) is, for GPT-2/OPT auxiliaries and the reference backward rule:

* linear layer ``y = W x + b``: one linear-attention head from tokens to the layer's prefix rows,
  ``q = [x, 1]``, ``k_j = [w_j, b_j]``, ``v_j = e_j``; backward ``W^T dy``: ``q = dy``, ``k_j = e_j``,
  ``v_j = w_j``; update: prefix rows attend to tokens, ``q_j = e_j``, ``k_t = dy_t``, ``v_t = [x_t, 1]``,
  written to ``w_j`` with scale ``-lr`` (so the bias step is exactly ``-lr * sum_t dy_t``: no x4 defect);
* attention: softmax heads simulate the auxiliary heads exactly and also store each row of attention
  probabilities (values = one-hot positions); backward with detached probabilities is a linear head
  ``q_t = onehot(t)``, ``k_s = probs_s``, ``v_s = do_s``, i.e. ``dv_t = sum_s P[s, t] do_s``;
* LayerNorm and activation backward: ``N [f(x + g/N) - f(x)]`` with real LayerNorm / MLP modules;
* loss gradient: softmax attention over the vocabulary rows gives ``E^T softmax(E u)``; the target embedding
  arrives by a shift head; the per-token loss weight multiplies it through a diagonal linear head.

Identical modules (same pattern; only the mask differs, e.g. the forward of every non-updated block) are
built once and reused. The structured realization computes the same numbers without the zero weights.
Llama-family auxiliaries (RMSNorm, SwiGLU, RoPE, grouped-query attention) subclass this program in
:mod:`hdopt.tint.explicit_llama`; :func:`explicit_tint` picks the class for an auxiliary.
"""

from __future__ import annotations

import torch
from torch import nn

from hdopt.tint.aux import AuxSpec
from hdopt.tint.config import TinTConfig
from hdopt.tint.gadgets import MLP, Attention, Norm, Patterns, Registers, Term
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
    Subclasses for other families override the class attributes below, the layout hooks
    (:meth:`_layer_groups`, :meth:`_sizes`), :meth:`block_forward`, :meth:`block_backward` and
    :meth:`_prefix_entries`.
    """

    FAMILY = "gpt2"
    NORM: type[Norm] = Norm
    TOKENS = ("pos", "one", "c", "tok", "emb", "tgt", "x", "g", "S.qkv")  # input and work registers
    SCRATCH = ("n1", "u1", "o", "n2", "u2", "h", "a")  # a block's activations (kept for simulated blocks)
    BACKWARD = ("da", "dh", "du2", "dn2", "do", "dqkv", "du1", "dn1")
    LOSS = ("nf", "uf", "pe", "duf", "dnf")
    MEMBERS = {"ln1": ("ln1",), "qkv": ("q", "k", "v"), "o": ("o",), "ln2": ("ln2",), "fc": ("fc",),
               "proj": ("proj",)}  # prefix group -> the auxiliary's tensors it holds (for biases)

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
        T = config.max_len
        self.first = spec.n_layers - config.n_layers
        self.tops = list(range(self.first, spec.n_layers))
        self._layout_prefix()
        self._layout_tokens()
        self.width = max(self.pre.width, self.tok.width)
        self.bias_slot = self.pre["w"][1] - 1  # index of the bias inside register w
        self.patterns = Patterns()
        self.ops = nn.ModuleList()
        self.program: list[tuple] = []  # (op index, mask kind, gate kind) or ("loss",)
        self._keys: dict[tuple, int] = {}
        self.uses = 0  # module applications, i.e. the parameter count without reuse is sum over uses
        self._unshared = 0
        self._build_program(T)
        self.register_buffer("prefix", self._encode_prefix(), persistent=False)

    # ------------------------------------------------------------------ layouts
    @property
    def kept(self) -> tuple[str, ...]:
        """Registers each simulated block keeps for its backward pass."""
        return ("x", "x2", "A", *self.SCRATCH)

    def _layer_groups(self) -> list[tuple[str, int, int]]:
        """(name, rows = output width, input width) of each linear map of one block, in prefix order."""
        D, Fd = self.spec.d_model, self.spec.d_ff
        return [("ln1", D, D), ("qkv", 3 * D, D), ("o", D, D), ("ln2", D, D), ("fc", Fd, D), ("proj", D, Fd)]

    def _sizes(self) -> dict[str, int]:
        """Widths of the token registers (D when absent)."""
        s, D, Fd, T = self.spec, self.spec.d_model, self.spec.d_ff, self.config.max_len
        return {"pos": T, "one": 1, "c": 1, "n1": D, "u1": D, "o": D, "n2": D, "u2": D, "h": Fd, "a": Fd,
                "x": D, "x2": D, "A": s.n_heads * T, "qkv": 3 * D, "da": Fd, "dh": Fd, "dqkv": 3 * D}

    def _layout_prefix(self) -> None:
        s, D = self.spec, self.spec.d_model
        groups = self._layer_groups()
        self.pre = Registers()
        self.pre.add("w", max(d_in for _, _, d_in in groups) + 1)  # [weight row, bias]
        self.pre.add("e", max(n for _, n, _ in groups))  # one-hot of the row inside its group
        self.groups: dict[str, tuple[int, int]] = {}
        rows = 0
        for layer in range(s.n_layers):
            for name, n, _ in groups:
                self.groups[f"{layer}.{name}"] = (rows, n)
                rows += n
        for name, n in (("lnf", D), ("vocab", s.vocab_size)):
            self.groups[name] = (rows, n)
            rows += n
        self.n_prefix = rows

    def _layout_tokens(self) -> None:
        sizes, D = self._sizes(), self.spec.d_model
        self.tok = Registers()
        for name in self.TOKENS:
            self.tok.add(name, sizes.get(name.removeprefix("S."), D))
        for name in self.SCRATCH:
            self.tok.add(f"S.{name}", sizes[name])
        for name in self.BACKWARD + self.LOSS:
            self.tok.add(name, sizes.get(name, D))
        for i in self.tops:  # activations kept for the backward pass of each simulated block
            for name in self.kept:
                self.tok.add(f"L{i}.{name}", sizes[name])

    # ------------------------------------------------------------------ terms
    def _t(self, name: str, scale: float = 1.0, off: int = 0, start: int = 0, n: int | None = None) -> Term:
        s, length = self.tok[name]
        return (s + start, length - start if n is None else n, scale, off)

    def _p(self, name: str, scale: float = 1.0, off: int = 0, start: int = 0, n: int | None = None) -> Term:
        s, length = self.pre[name]
        return (s + start, length - start if n is None else n, scale, off)

    # ------------------------------------------------------------------ ops
    def _op(self, key: tuple, make, fill, mask, gate) -> None:
        """Append a module application; modules with the same pattern ``key`` are shared."""
        if key not in self._keys:
            module = make()
            with torch.no_grad():
                fill(module)
            self._keys[key] = len(self.ops)
            self.ops.append(module)
        self._unshared += sum(p.numel() for p in self.ops[self._keys[key]].parameters())
        self.program.append((self._keys[key], mask, gate))

    def _attn(self, heads, dqk, dv, softmax):
        return lambda: Attention(self.width, heads, dqk, dv, softmax, self.device, self.dtype)

    def _fill(self, q=(), k=(), v=(), o=()):
        P = self.patterns

        def fill(m):
            P.read(m.q.weight, list(q))
            P.read(m.k.weight, list(k))
            P.read(m.v.weight, list(v))
            P.write(m.o.weight, list(o))
        return fill

    def lin_forward(self, group: str, src: str, dst: str, d_in: int, d_out: int) -> None:
        """dst += W x + b with (W, b) in the group's prefix rows."""
        fill = self._fill(q=[self._t(src, n=d_in), self._t("one", off=d_in)],
                          k=[self._p("w", n=d_in), self._p("w", start=self.bias_slot, n=1, off=d_in)],
                          v=[self._p("e", n=d_out)], o=[self._t(dst, n=d_out)])
        self._op(("linf", src, dst, d_in, d_out), self._attn(1, d_in + 1, d_out, False), fill,
                 ("tok->grp", group), "tok")

    def lin_backward(self, group: str, grad: str, dst: str, d_in: int, d_out: int) -> None:
        """dst += W^T dy."""
        fill = self._fill(q=[self._t(grad, n=d_out)], k=[self._p("e", n=d_out)], v=[self._p("w", n=d_in)],
                          o=[self._t(dst, n=d_in)])
        self._op(("linb", grad, dst, d_in, d_out), self._attn(1, d_out, d_in, False), fill,
                 ("tok->grp", group), "tok")

    def lin_update(self, group: str, grad: str, src: str | None, d_in: int, d_out: int,
                   bias: bool = True) -> None:
        """w_j -= lr * sum_t dy_t[j] [x_t, 1] in the group's prefix rows (bias only when src is None; weight
        only when not ``bias``)."""
        lr = self.config.inner_lr
        v, o = [], []
        if bias:
            v.append(self._t("one", off=d_in))
            o.append(self._p("w", scale=-lr, start=self.bias_slot, n=1, off=d_in))
        if src is not None:
            v.append(self._t(src, n=d_in))
            o.append(self._p("w", scale=-lr, n=d_in))
        fill = self._fill(q=[self._p("e", n=d_out)], k=[self._t(grad, n=d_out)], v=v, o=o)
        self._op(("upd", grad, src, d_in, d_out, bias), self._attn(1, d_out, d_in + 1, False), fill,
                 ("grp->tok", group), ("grp", group))

    def norm(self, terms: list[Term], dst: str, scale: float = 1.0) -> None:
        """dst += scale * normalize(sum of terms) (LayerNorm or RMSNorm without gain, D wide)."""
        D = self.spec.d_model

        def fill(m):
            self.patterns.read(m.read.weight, terms)
            self.patterns.write(m.write.weight, [self._t(dst, scale=scale)])
        self._op(("norm", tuple(terms), dst, scale),
                 lambda: self.NORM(self.width, D, self.spec.norm_eps, self.device, self.dtype), fill, None,
                 "tok")

    def act(self, terms: list[Term], dst: str, scale: float = 1.0) -> None:
        """dst += scale * f(sum of terms) elementwise (d_ff wide)."""
        def fill(m):
            self.patterns.read(m.fc.weight, terms)
            self.patterns.write(m.proj.weight, [self._t(dst, scale=scale)])
        s = self.spec
        self._op(("act", tuple(terms), dst, scale),
                 lambda: MLP(self.width, s.d_ff, s.activation, self.device, self.dtype), fill, None, "tok")

    def linmap(self, pairs: list[tuple[str, str, float]]) -> None:
        """For each (src, dst, scale): dst += scale * src, exactly, by a ReLU MLP (relu(z) - relu(-z) = z)."""
        n = sum(self.tok[s][1] for s, _, _ in pairs)
        reads, writes, off = [], [], 0
        for src, dst, scale in pairs:
            reads += [self._t(src, off=off), self._t(src, scale=-1.0, off=n + off)]
            writes += [self._t(dst, scale=scale, off=off), self._t(dst, scale=-scale, off=n + off)]
            off += self.tok[src][1]

        def fill(m):
            self.patterns.read(m.fc.weight, reads)
            self.patterns.write(m.proj.weight, writes)
        self._op(("lin", tuple(pairs)), lambda: MLP(self.width, 2 * n, "relu", self.device, self.dtype),
                 fill, None, "tok")

    def clear(self, names: list[str]) -> None:
        self.linmap([(r, r, -1.0) for r in names])

    def has_bias(self, layer: int, group: str) -> bool:
        """Whether the auxiliary has the biases of a prefix group (then the update moves them)."""
        present = {f"{name}.b" in self.spec.blocks[layer] for name in self.MEMBERS[group]}
        if len(present) > 1:
            raise NotImplementedError(f"group {group} of block {layer} has biases on some members only")
        return present.pop()

    # ------------------------------------------------------------------ program
    def _prologue(self, T: int) -> None:
        """x = input embedding; tgt = the next token's output embedding."""
        D = self.spec.d_model
        self.linmap([("emb", "x", 1.0)])
        # target embedding: token t reads token t+1's embedding (a shift head on one-hot positions)
        self._op(("shift",), self._attn(1, T, D, False),
                 self._fill(q=[self._t("pos", n=T - 1, off=1)], k=[self._t("pos")], v=[self._t("tok")],
                            o=[self._t("tgt")]), "tok->tok", "tok")

    def _build_program(self, T: int) -> None:
        D = self.spec.d_model
        self._prologue(T)
        for layer in range(self.spec.n_layers):
            self.block_forward(layer, f"L{layer}" if layer >= self.first else "S")
        for step in range(self.config.n_steps):
            if step > 0:  # restart the simulated blocks from the stored input of the lowest one
                stored = [f"L{i}.{r}" for i in self.tops for r in self.kept]
                self.linmap([(f"L{self.first}.x", "x", 1.0), ("x", "x", -1.0), ("g", "g", -1.0)]
                            + [(r, r, -1.0) for r in stored])
                for layer in self.tops:
                    self.block_forward(layer, f"L{layer}")
            self.loss_gradient()
            for layer in reversed(self.tops):
                self.block_backward(layer, f"L{layer}")
        self.linmap([("emb", "x", 1.0), ("x", "x", -1.0)])  # the updated model's forward starts afresh
        for layer in range(self.spec.n_layers):
            self.block_forward(layer, "S")
        self.norm([self._t("x")], "nf")
        self.lin_forward("lnf", "nf", "uf", D, D)

    def block_forward(self, layer: int, ns: str) -> None:
        """One GPT-2 block; ``ns`` names the registers keeping its activations ("S": scratch, cleared)."""
        D, Fd, H, T = self.spec.d_model, self.spec.d_ff, self.spec.n_heads, self.config.max_len
        dh, keep = D // H, ns != "S"
        if keep:
            self.linmap([("x", f"{ns}.x", 1.0)])
        self.norm([self._t("x")], f"{ns}.n1")
        self.lin_forward(f"{layer}.ln1", f"{ns}.n1", f"{ns}.u1", D, D)
        self.lin_forward(f"{layer}.qkv", f"{ns}.u1", "S.qkv", D, 3 * D)
        dv = dh + (T if keep else 0)  # kept blocks also store each row of attention probabilities
        q = [self._t("S.qkv", scale=self.spec.attn_scale, start=h * dh, n=dh, off=h * dh) for h in range(H)]
        k = [self._t("S.qkv", start=D + h * dh, n=dh, off=h * dh) for h in range(H)]
        v = [self._t("S.qkv", start=2 * D + h * dh, n=dh, off=h * dv) for h in range(H)]
        o = [self._t(f"{ns}.o", start=h * dh, n=dh, off=h * dv) for h in range(H)]
        if keep:
            v += [self._t("pos", off=h * dv + dh) for h in range(H)]
            o += [self._t(f"{ns}.A", start=h * T, n=T, off=h * dv + dh) for h in range(H)]
        self._op(("attn", ns), self._attn(H, dh, dv, True), self._fill(q, k, v, o), "causal", "tok")
        self.lin_forward(f"{layer}.o", f"{ns}.o", "x", D, D)
        if keep:
            self.linmap([("x", f"{ns}.x2", 1.0)])
        self.norm([self._t("x")], f"{ns}.n2")
        self.lin_forward(f"{layer}.ln2", f"{ns}.n2", f"{ns}.u2", D, D)
        self.lin_forward(f"{layer}.fc", f"{ns}.u2", f"{ns}.h", D, Fd)
        self.act([self._t(f"{ns}.h")], f"{ns}.a")
        self.lin_forward(f"{layer}.proj", f"{ns}.a", "x", Fd, D)
        self.clear(["S.qkv"] + ([] if keep else [f"S.{r}" for r in self.SCRATCH]))

    def loss_gradient(self) -> None:
        """g = d loss / d x at the last block's output: c_t (E^T softmax(E u_t) - e_{t+1}) through ln_f."""
        D, N = self.spec.d_model, self.config.fd_scale
        self.norm([self._t("x")], "nf")
        self.lin_forward("lnf", "nf", "uf", D, D)
        self.program.append(("loss",))  # read out the inner loss (not part of the construction)
        self._op(("vocab",), self._attn(1, D, D, True),
                 self._fill(q=[self._t("uf")], k=[self._p("w", n=D)], v=[self._p("w", n=D)],
                            o=[self._t("pe")]), ("tok->grp", "vocab"), "tok")
        self._op(("weight",), self._attn(1, 1, D, False),
                 self._fill(q=[self._t("c")], k=[self._t("one")],
                            v=[self._t("pe"), self._t("tgt", scale=-1.0)], o=[self._t("duf")]), "diag", "tok")
        self.lin_backward("lnf", "duf", "dnf", D, D)
        self.norm([self._t("x"), self._t("dnf", scale=1.0 / N)], "g", scale=N)
        self.linmap([("nf", "g", -N)])
        self.clear(list(self.LOSS))

    @property
    def dq(self) -> int:
        """Width of all query heads."""
        return self.spec.n_heads * self.spec.head_dim

    @property
    def dkv(self) -> int:
        """Width of all key (or value) heads."""
        return self.spec.n_kv_heads * self.spec.head_dim

    def block_backward(self, layer: int, ns: str) -> None:
        """Reference-rule backward and SGD update of one block; g holds d loss / d (block output)."""
        self.mlp_backward(layer, ns)
        self.attention_backward(layer, ns)

    def mlp_backward(self, layer: int, ns: str) -> None:
        """Backward and update of the block's MLP; leaves d loss / d (MLP input) in du2."""
        D, Fd, N = self.spec.d_model, self.spec.d_ff, self.config.fd_scale
        self.lin_backward(f"{layer}.proj", "g", "da", Fd, D)
        self.lin_update(f"{layer}.proj", "g", f"{ns}.a", Fd, D, self.has_bias(layer, "proj"))
        self.act([self._t(f"{ns}.h"), self._t("da", scale=1.0 / N)], "dh", scale=N)
        self.linmap([(f"{ns}.a", "dh", -N)])
        self.lin_backward(f"{layer}.fc", "dh", "du2", D, Fd)
        self.lin_update(f"{layer}.fc", "dh", f"{ns}.u2", D, Fd, self.has_bias(layer, "fc"))

    def attention_backward(self, layer: int, ns: str) -> None:
        """From du2 (d loss / d MLP input) down through ln2, the attention sublayer and ln1 into g.

        Shared by both families: query heads of a key/value group (GQA; one head per group for GPT-2/OPT)
        add into the same dv coordinates."""
        s, T, N = self.spec, self.config.max_len, self.config.fd_scale
        D, Dq, Dkv, H, dh = s.d_model, self.dq, self.dkv, s.n_heads, s.head_dim
        rep = s.n_heads // s.n_kv_heads
        self.lin_backward(f"{layer}.ln2", "du2", "dn2", D, D)
        if self.has_bias(layer, "ln2"):
            self.lin_update(f"{layer}.ln2", "du2", None, D, D)
        self.norm([self._t(f"{ns}.x2"), self._t("dn2", scale=1.0 / N)], "g", scale=N)
        self.linmap([(f"{ns}.n2", "g", -N)])
        self.lin_backward(f"{layer}.o", "g", "do", Dq, D)
        self.lin_update(f"{layer}.o", "g", f"{ns}.o", Dq, D, self.has_bias(layer, "o"))
        # dv_t = sum over the group's query heads h of sum_s P_h[s, t] do_s (probabilities detached)
        self._op(("attnT", ns), self._attn(H, T, dh, False),
                 self._fill(q=[self._t("pos", off=h * T) for h in range(H)],
                            k=[self._t(f"{ns}.A", start=h * T, n=T, off=h * T) for h in range(H)],
                            v=[self._t("do", start=h * dh, n=dh, off=h * dh) for h in range(H)],
                            o=[self._t("dqkv", start=Dq + Dkv + h // rep * dh, n=dh, off=h * dh)
                               for h in range(H)]),
                 "tok->tok", "tok")
        self.lin_backward(f"{layer}.qkv", "dqkv", "du1", D, Dq + 2 * Dkv)
        self.lin_update(f"{layer}.qkv", "dqkv", f"{ns}.u1", D, Dq + 2 * Dkv, self.has_bias(layer, "qkv"))
        self.lin_backward(f"{layer}.ln1", "du1", "dn1", D, D)
        if self.has_bias(layer, "ln1"):
            self.lin_update(f"{layer}.ln1", "du1", None, D, D)
        self.norm([self._t(f"{ns}.x"), self._t("dn1", scale=1.0 / N)], "g", scale=N)
        self.linmap([(f"{ns}.n1", "g", -N)])
        self.clear(list(self.BACKWARD))

    # ------------------------------------------------------------------ inputs and running
    def _prefix_entries(self):
        """Yield (group, weight (rows, in), bias (rows,) or None) for every linear map but the vocabulary."""
        s, D = self.spec, self.spec.d_model
        for layer, b in enumerate(s.blocks):
            yield f"{layer}.ln1", torch.diag(b["ln1.w"]), b["ln1.b"]
            qkv_b = torch.cat([b.get(f"{n}.b", torch.zeros(D, dtype=self.dtype)) for n in "qkv"])
            yield f"{layer}.qkv", torch.cat([b[f"{n}.w"] for n in "qkv"]), qkv_b
            yield f"{layer}.o", b["o.w"], b.get("o.b")
            yield f"{layer}.ln2", torch.diag(b["ln2.w"]), b["ln2.b"]
            yield f"{layer}.fc", b["fc.w"], b.get("fc.b")
            yield f"{layer}.proj", b["proj.w"], b.get("proj.b")
        yield "lnf", torch.diag(s.ln_f["w"]), s.ln_f.get("b")

    def _encode_prefix(self) -> torch.Tensor:
        """(P, W) prefix rows: [weight row, bias] in w and the row's one-hot in e."""
        s, D = self.spec, self.spec.d_model
        X = torch.zeros(self.n_prefix, self.width, dtype=self.dtype, device=self.device)
        if X.device.type == "meta":
            return X
        w0, e0 = self.pre["w"][0], self.pre["e"][0]
        for group, weight, bias in self._prefix_entries():
            start, n = self.groups[group]
            X[start:start + n, w0:w0 + weight.shape[1]] = weight
            if bias is not None:
                X[start:start + n, w0 + self.bias_slot] = bias
            X[start + torch.arange(n), e0 + torch.arange(n)] = 1.0
        start, n = self.groups["vocab"]
        X[start:start + n, w0:w0 + D] = s.lm_head
        return X

    def _encode_tokens(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(B, T, W) token rows; ``weights`` (B, T) is each position's loss weight (for predicting t+1).

        ``tok`` holds the token's output embedding (the loss gradient's target row), ``emb`` its input
        embedding (+ learned position).
        """
        s, (B, T) = self.spec, ids.shape
        X = torch.zeros(B, T, self.width, dtype=self.dtype)
        pos0, one, c = self.tok["pos"][0], self.tok["one"][0], self.tok["c"][0]
        tok0, emb0, D = self.tok["tok"][0], self.tok["emb"][0], s.d_model
        X[:, torch.arange(T), pos0 + torch.arange(T)] = 1.0
        X[..., one], X[..., c] = 1.0, weights
        X[..., tok0:tok0 + D] = s.lm_head[ids]
        X[..., emb0:emb0 + D] = s.wte[ids]
        if s.wpe is not None:
            X[..., emb0:emb0 + D] += s.wpe[torch.arange(T) + s.pos_offset]
        return X

    def _masks(self, T: int) -> dict:
        P, N = self.n_prefix, self.n_prefix + T
        tok = torch.zeros(N, dtype=torch.bool)
        tok[P:] = True

        def rows(group: str) -> torch.Tensor:
            m = torch.zeros(N, dtype=torch.bool)
            start, n = self.groups[group]
            m[start:start + n] = True
            return m

        causal = torch.zeros(N, N, dtype=torch.bool)
        causal[P:, P:] = torch.ones(T, T, dtype=torch.bool).tril()
        diag = torch.zeros(N, N, dtype=torch.bool)
        diag[P + torch.arange(T), P + torch.arange(T)] = True
        masks = {"causal": causal, "diag": diag, "tok->tok": tok[:, None] & tok[None, :], None: None,
                 "tok": tok[:, None].to(self.dtype)}
        for g in self.groups:
            masks[("tok->grp", g)] = tok[:, None] & rows(g)[None, :]
            masks[("grp->tok", g)] = rows(g)[:, None] & tok[None, :]
            masks[("grp", g)] = rows(g)[:, None].to(self.dtype)
        for kind, m in list(masks.items()):  # rows with nothing to attend to (gated off) see themselves
            if m is not None and m.dim() == 2 and m.dtype == torch.bool and m.shape[1] == N:
                masks[kind] = m | (torch.eye(N, dtype=torch.bool) & ~m.any(-1, keepdim=True))
        return masks

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
        masks, P = self._masks(T), self.n_prefix
        losses = []
        for entry in self.program:
            if entry[0] == "loss":
                losses.append(self._loss(X[:, P:], input_ids, w))
                continue
            op, mask, gate = entry
            X = self.ops[op](X, masks[mask], masks[gate])
        uf0, D = self.tok["uf"][0], self.spec.d_model
        logits = X[:, P + context_len - 1:, uf0:uf0 + D] @ self.spec.lm_head.mT
        inner = torch.stack(losses) if losses else torch.zeros(0, B, dtype=self.dtype)
        return TinTOutput(query_logits=logits, inner_losses=inner, blocks=[])

    def _loss(self, tokens: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        uf0, D = self.tok["uf"][0], self.spec.d_model
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
                "module_applications": len([e for e in self.program if e[0] != "loss"]),
                "params_reused": self.num_parameters(True), "params_no_reuse": self.num_parameters(False),
                "nonzero_pattern_weights": self.patterns.nonzeros, "embeddings": self._embedding_params()}
