"""The compact explicit TinT: a transformer of real modules, packed as the paper packs it, that runs.

Rows of the state ``X`` (B, N, W): P prefix rows holding the auxiliary's linear maps (S weight rows per prefix
token, :mod:`hdopt.tint.compact.prefix`), then the T input tokens, then one block of T *memory rows* per
simulated layer, which keeps that layer's input for the backward pass. Token rows hold the activations of one
block at a time in a fixed set of registers (overlaid by lifetime), so the width does not grow with depth:

* the backward of a simulated layer first recomputes its forward from the stored input (activation
  checkpointing): the same modules, applied again, and the attention backward recomputes the probabilities
  from the stored queries and keys (:class:`~hdopt.tint.compact.modules.TransposedAttention`);
* the MLP is processed in chunks of its hidden units (the reference splits it in 4); the output-projection
  bias lives in the first chunk only, and its update is one bias-only module application, so the bias step
  is ``-lr * sum_t dy_t`` exactly (the reference's chunks each apply it: a 4x step);
* every module is keyed by its fixed pattern, so one module serves every layer, step and chunk: only the
  mask (which prefix group, which memory block) changes between applications.

The program, reference backward rule (GPT-2/OPT here; Llama family in :mod:`hdopt.tint.compact.llama`):

* linear map ``y = W x + b`` (group of K prefix rows, S slots): S linear-attention heads from tokens to the
  group, head s with ``q = [x, 1]``, ``k_j = slot s of row j``, ``v_j = e_j``; backward ``W^T dy``:
  ``q = dy[sK:(s+1)K]``, ``k_j = e_j``, ``v_j = slot s``; update (prefix rows attend to tokens):
  ``q_j = e_j``, ``k_t = dy_t[sK:(s+1)K]``, ``v_t = [x_t, 1]``, written to slot s with scale ``-lr``;
* LayerNorm gain = the diagonal map ``diag(gamma)`` with bias ``beta``; norm and activation backward by
  ``N [f(x + g/N) - f(x)]`` with real LayerNorm / MLP modules;
* loss gradient: ``c_t (E^T softmax(E u_t) - e_{t+1})``: a softmax head over the output embeddings
  (:class:`~hdopt.tint.compact.modules.VocabAttention`), the next token's embedding by a shift head from the
  first memory block;
* copies and clears: one linear head per row pair with ``q = k = 1`` (score exactly 1).

Masks are hard, so the only approximation is the rule's finite difference, computed as the structured
realization computes it. Modules are dense ``nn.Linear`` weights; :mod:`hdopt.tint.compact.executor` runs
them densely (tests) or without their exact zeros (large auxiliaries).
"""

from __future__ import annotations

import torch
from torch import nn

from hdopt.tint.aux import AuxSpec, Block
from hdopt.tint.compact.executor import RowMap, Site, SlicedRunner, State, apply_dense
from hdopt.tint.compact.modules import TransposedAttention, VocabAttention
from hdopt.tint.compact.ops import GadgetBuilder
from hdopt.tint.compact.prefix import PrefixLayout
from hdopt.tint.config import TinTConfig
from hdopt.tint.gadgets import Norm, Patterns, Registers
from hdopt.tint.structured import TinTOutput

ROWS_PER_PREFIX = 3  # weight rows of a d_model-input map per prefix token (the reference: 3 for GPT-2)
LOSS = ("loss",)  # program entry: read out the inner loss (not part of the construction)


class CompactTinT(GadgetBuilder):
    """Compact explicit TinT of a GPT-2/OPT auxiliary (``backward='reference'``); see the module docstring.

    Args:
        spec: the auxiliary. config: what is simulated (``max_len`` bounds the positions).
        device: "meta" counts parameters without allocating.
        mlp_chunk: hidden units of the MLP per chunk (default: the largest divisor of d_ff that fits the
            registers of the attention sublayer).
        slot_budget: prefix-row coordinates for packed weight rows (default 3 (d_model + 1): three weight rows
            of a d_model-input map per prefix token, the reference's packing of GPT-2).
    """

    FAMILY = "gpt2"
    NORM: type[Norm] = Norm
    MLP_REGISTERS = 4  # chunk-wide registers of the MLP backward: h, a, da, dh
    QK = "qk"  # the register holding the queries and keys the attention reads (Llama: after RoPE)

    def __init__(self, spec: AuxSpec, config: TinTConfig, device=None, mlp_chunk: int | None = None,
                 slot_budget: int | None = None):
        super().__init__()
        if spec.family != self.FAMILY:
            raise ValueError(f"{type(self).__name__} is for {self.FAMILY!r} auxiliaries, got {spec.family!r} "
                             "(use hdopt.tint.compact.compact_tint)")
        if config.backward != "reference" or config.n_layers > spec.n_layers:
            raise ValueError("the compact TinT needs backward='reference' and n_layers <= the auxiliary's "
                             "number of blocks")
        self.spec, self.config, self.device, self.dtype = spec, config, device, spec.dtype
        self.first = spec.n_layers - config.n_layers
        self.tops = list(range(self.first, spec.n_layers))
        self.chunk = mlp_chunk or self.default_chunk()
        if spec.d_ff % self.chunk:
            raise ValueError(f"mlp_chunk={self.chunk} must divide d_ff={spec.d_ff}")
        self.n_chunks = spec.d_ff // self.chunk
        self._layout_tokens()
        self.pre = PrefixLayout(self._maps(), slot_budget or ROWS_PER_PREFIX * (spec.d_model + 1))
        self.width = max(self.pre.width, self.tok.width, self.mem.width)
        self.patterns = Patterns()
        self.ops = nn.ModuleList()
        self.program: list = []  # (op index, Site) or LOSS
        self._keys: dict[tuple, int] = {}
        self._unshared = 0
        self._scope: int | str = "io"  # the block an application belongs to (for the layer-scoped count)
        self._scoped: dict[tuple, int] = {}
        self._build_program()
        self.register_buffer("prefix", self._encode_prefix(), persistent=False)
        self._sliced = SlicedRunner()

    # ------------------------------------------------------------------ shapes and layouts
    @property
    def dq(self) -> int:
        return self.spec.n_heads * self.spec.head_dim

    @property
    def dkv(self) -> int:
        return self.spec.n_kv_heads * self.spec.head_dim

    def attention_width(self) -> int:
        """Registers of the attention sublayer: q, k, v, o."""
        return 2 * self.dq + 2 * self.dkv

    def default_chunk(self) -> int:
        return mlp_chunk_for(self.spec.d_model, self.spec.d_ff, self.attention_width(), self.MLP_REGISTERS)

    def _maps(self) -> list[tuple[str, str, int, int]]:
        """(group, kind, d_in, d_out) of every packed linear map, in prefix order."""
        D = self.spec.d_model
        out = []
        for layer in range(self.spec.n_layers):
            out += [(f"{layer}.ln1", "ln", D, D), (f"{layer}.qk", "qk", D, self.dq + self.dkv),
                    (f"{layer}.v", "v", D, self.dkv), (f"{layer}.o", "o", self.dq, D),
                    (f"{layer}.ln2", "ln", D, D)]
            out += self._mlp_maps(layer)
        return out + [("lnf", "ln", D, D)]

    def _mlp_maps(self, layer: int) -> list[tuple[str, str, int, int]]:
        D, c = self.spec.d_model, self.chunk
        return [m for i in range(self.n_chunks) for m in ((f"{layer}.fc{i}", "fc", D, c),
                                                          (f"{layer}.proj{i}", "proj", c, D))]

    def _extra_inputs(self) -> list[tuple[str, int]]:
        """Input registers besides one, c and x (Llama: the rotary tables)."""
        return []

    def _mlp_views(self) -> list[tuple[str, int]]:
        """Chunk registers of the MLP, laid out after du in R."""
        c = self.chunk
        return [("h", c), ("a", c), ("da", c), ("dh", c)]

    def _layout_tokens(self) -> None:
        """Token registers; ``R`` is a scratch region whose views are live at different times."""
        D, Dq, Dkv = self.spec.d_model, self.dq, self.dkv
        t = Registers()
        for name, n in [("one", 1), ("c", 1), ("x", D), ("g", D), *self._extra_inputs()]:
            t.add(name, n)
        if Dq > D:
            t.add("do", Dq)
        else:
            t.view("do", "x", 0, Dq)  # the attention backward clears x before writing do
        mlp = sum(n for _, n in self._mlp_views())
        t.add("u", D)
        t.add("R", max(self.attention_width(), D + mlp, 4 * D))
        t.view("Rmlp", "R", D, t["R"][1] - D)  # everything in R but du: the MLP chunk's registers
        for name, start, n in [("n", 0, D), ("du", 0, D), ("dn", D, D), ("fd", 2 * D, D), ("pe", 3 * D, D),
                               ("q", 0, Dq),
                               ("qk", 0, Dq + Dkv), ("k", Dq, Dkv), ("v", Dq + Dkv, Dkv),
                               ("dv", Dq + Dkv, Dkv), ("o", Dq + 2 * Dkv, Dq)]:
            t.view(name, "R", start, n)
        off = D
        for name, n in self._mlp_views():
            t.view(name, "R", off, n)
            off += n
        self.tok = t
        m = Registers()  # memory rows: the stored block input; the first block also holds the targets
        for name, n in [("one", 1), ("xin", D), ("tok", D)]:
            m.add(name, n)
        self.mem = m

    # ------------------------------------------------------------------ program
    def _build_program(self) -> None:
        for layer in range(self.first):
            self._scope = layer
            self.block_forward(layer)
        for step in range(self.config.n_steps):
            if step:  # restart the simulated layers from the stored input of the lowest one
                self.clear(["g"])
                self.restore(0)
            for i, layer in enumerate(self.tops):
                self._scope = layer
                if i and step:
                    self.forget(i)
                if i or not step:
                    self.store(i)
                self.block_forward(layer)
            self._scope = "io"
            self.loss_gradient()
            for i, layer in reversed(list(enumerate(self.tops))):
                self._scope = layer
                self.block_backward(layer, i)
        self._scope = "io"
        if self.config.n_steps:  # the updated model's forward, from the stored input of the lowest layer
            self.clear(["g"])
            self.restore(0)
        for layer in self.tops:
            self._scope = layer
            self.block_forward(layer)
        self._scope = "io"
        self.final_norm()

    def final_norm(self) -> None:
        """u = ln_f(x) (the output head reads u)."""
        self.norm([self._t("x")], "n")
        self.lin_forward("lnf", "n", "u")
        self.clear(["n"])

    def attention_scratch(self) -> list[str]:
        """Registers the attention sublayer's forward fills."""
        return ["q", "k", "v", "o"]

    def attention_inputs(self, layer: int) -> None:
        """u = ln1(x), then the queries, keys and values of the block's attention."""
        self.norm([self._t("x")], "n")
        self.lin_forward(f"{layer}.ln1", "n", "u")
        self.clear(["n"])
        self.lin_forward(f"{layer}.qk", "u", "qk")
        self.lin_forward(f"{layer}.v", "u", "v")

    def _heads(self, qk_src: str, v_src: str, out: str, scale: float, transposed: bool):
        """q/k/v/o terms of the H auxiliary heads (grouped-query: head h reads key/value head h // rep)."""
        s = self.spec
        dh, rep = s.head_dim, s.n_heads // s.n_kv_heads
        q = [self._t(qk_src, scale=scale, start=h * dh, n=dh, off=h * dh) for h in range(s.n_heads)]
        k = [self._t(qk_src, start=self.dq + h // rep * dh, n=dh, off=h * dh) for h in range(s.n_heads)]
        if transposed:  # values: do of head h; output: dv of its key/value head (the group's heads add up)
            v = [self._t(v_src, start=h * dh, n=dh, off=h * dh) for h in range(s.n_heads)]
            o = [self._t(out, start=h // rep * dh, n=dh, off=h * dh) for h in range(s.n_heads)]
        else:
            v = [self._t(v_src, start=h // rep * dh, n=dh, off=h * dh) for h in range(s.n_heads)]
            o = [self._t(out, start=h * dh, n=dh, off=h * dh) for h in range(s.n_heads)]
        return q, k, v, o

    def attention_core(self) -> None:
        """o = softmax attention of the auxiliary's heads (causal)."""
        s = self.spec
        q, k, v, o = self._heads(self.QK, "v", "o", s.attn_scale, transposed=False)
        self.attention(Site("tok", "tok", "causal"), s.n_heads, s.head_dim, s.head_dim, q, k, v, o,
                       softmax=True)

    def attention_transposed(self) -> None:
        """dv = sum_s P[s, t] do_s with P recomputed from q and k (detached probabilities)."""
        s = self.spec
        q, k, v, o = self._heads(self.QK, "do", "dv", s.attn_scale, transposed=True)
        self.attention(Site("tok", "tok", "causal"), s.n_heads, s.head_dim, s.head_dim, q, k, v, o,
                       cls=TransposedAttention)

    def block_forward(self, layer: int) -> None:
        """One block on x (leaves only x)."""
        self.attention_inputs(layer)
        self.attention_core()
        self.lin_forward(f"{layer}.o", "o", "x")
        self.clear(["u", "R"])
        self.mlp_input(layer)
        for i in range(self.n_chunks):
            self.mlp_chunk_forward(layer, i)
            self.clear(["Rmlp"])
        self.clear(["u", "R"])

    def mlp_input(self, layer: int) -> None:
        self.norm([self._t("x")], "n")
        self.lin_forward(f"{layer}.ln2", "n", "u")
        self.clear(["n"])

    def mlp_chunk_forward(self, layer: int, i: int, accumulate: bool = True) -> None:
        """h = fc_i(u), a = f(h); x += proj_i(a) when ``accumulate``."""
        self.lin_forward(f"{layer}.fc{i}", "u", "h")
        self.act([self._t("h")], "a")
        if accumulate:
            self.lin_forward(f"{layer}.proj{i}", "a", "x")

    def loss_gradient(self) -> None:
        """g = d loss / d x at the top: c_t (E^T softmax(E u_t) - e_{t+1}) back through ln_f."""
        self.final_norm()
        self.program.append(LOSS)
        self._op(("vocab", self._t("u"), self._t("pe")),
                 lambda: VocabAttention(self.width, self.spec.lm_head, self.device, self.dtype),
                 self._vocab_fill, Site("tok"))
        c, one = [self._t("c")], [(0, 1, 1.0, 0)]
        self.attention(Site("tok", "tok", "pair"), 1, 1, self.spec.d_model, c, one, [self._t("pe")],
                       [self._t("du")])
        self.attention(Site("tok", "mem0", "shift"), 1, 1, self.spec.d_model, c, one,
                       [self._m("tok", scale=-1.0)], [self._t("du")])
        self.lin_backward("lnf", "du", "dn")
        self.norm_backward("dn")
        self.clear(["x", "u", "R"])

    def _vocab_fill(self, m: nn.Module) -> None:
        self.patterns.read(m.q.weight, [self._t("u")])
        self.patterns.write(m.o.weight, [self._t("pe")])

    def norm_backward(self, grad: str) -> None:
        """g += N [normalize(x + grad / N) - normalize(x)] (the rule's finite difference).

        The difference is formed first (in fd) and scaled after, as the structured rule computes it: scaling
        each term by N first would round two numbers N times larger."""
        N = self.config.fd_scale
        self.norm([self._t("x"), self._t(grad, scale=1.0 / N)], "fd")
        self.norm([self._t("x")], "fd", scale=-1.0)
        self.copy([(self._t("fd"), self._t("g", scale=N)), (self._t("fd"), self._t("fd", scale=-1.0))])

    def block_backward(self, layer: int, i: int) -> None:
        """Reference-rule backward and SGD update of one block; g holds d loss / d (block output)."""
        self.restore(i)  # recompute the MLP's input x2 = x + attention(x)
        self.attention_inputs(layer)
        self.attention_core()
        self.lin_forward(f"{layer}.o", "o", "x")
        self.clear(["u", "R"])
        self.mlp_backward(layer)
        self.attention_backward(layer, i)

    def mlp_backward(self, layer: int) -> None:
        """From g = d loss / d y through the MLP and ln2 into g (x holds the MLP input x2)."""
        self.mlp_input(layer)
        for i in range(self.n_chunks):
            self.mlp_chunk_backward(layer, i)
            self.clear(["Rmlp"])
        self.lin_backward(f"{layer}.ln2", "du", "dn")
        if self.has_bias("ln"):
            self.lin_update(f"{layer}.ln2", "du", None, bias=True)
        self.norm_backward("dn")
        self.clear(["x", "u", "R"])

    def mlp_chunk_backward(self, layer: int, i: int) -> None:
        """Chunk i of the MLP: recompute h, a; update proj_i and fc_i; du += fc_i^T dh."""
        self.mlp_chunk_forward(layer, i, accumulate=False)
        self.output_projection_step(f"{layer}.proj{i}", "a", "da", first_chunk=i == 0)
        self.act_backward("h", "da", "a", "dh")
        self.lin_backward(f"{layer}.fc{i}", "dh", "du")
        self.lin_update(f"{layer}.fc{i}", "dh", "u", bias=self.has_bias("fc"))

    def act_backward(self, h: str, grad: str, fh: str, dst: str) -> None:
        """dst = N [f(h + grad / N) - f(h)] (dst empty; fh holds f(h)); difference first, then x N."""
        N = self.config.fd_scale
        self.act([self._t(h), self._t(grad, scale=1.0 / N)], dst)
        self.copy([(self._t(fh), self._t(dst, scale=-1.0))])
        self.copy([(self._t(dst), self._t(dst, scale=N - 1.0))])

    def output_projection_step(self, group: str, src: str, dst: str, first_chunk: bool) -> None:
        """dst = W_i^T g and the update of the MLP's output projection chunk; its bias is in chunk 0 only."""
        kind = self.pre.groups[group].kind
        self.lin_backward(group, "g", dst)
        self.lin_update(group, "g", src, bias=False)
        if first_chunk and self.has_bias(kind):
            self.lin_update(group, "g", None, bias=True)

    def attention_backward(self, layer: int, i: int) -> None:
        """From g = d loss / d x2 through the attention sublayer and ln1 into g."""
        self.restore(i)
        self.attention_inputs(layer)
        self.clear(["x"])
        self.attention_core()
        self.lin_backward(f"{layer}.o", "g", "do")
        self.lin_update(f"{layer}.o", "g", "o", bias=self.has_bias("o"))
        self.clear(["v", "o"])
        self.attention_transposed()
        self.clear([r for r in self.attention_scratch() if r not in ("v", "o")] + ["do"])
        self.lin_backward(f"{layer}.v", "dv", "du")
        self.lin_update(f"{layer}.v", "dv", "u", bias=self.has_bias("v"))
        self.clear(["u", "dv"])
        self.lin_backward(f"{layer}.ln1", "du", "dn")
        if self.has_bias("ln"):
            self.lin_update(f"{layer}.ln1", "du", None, bias=True)
        self.restore(i)
        self.norm_backward("dn")
        self.clear(["x", "u", "R"])

    # ------------------------------------------------------------------ prefix: the auxiliary's weights
    def _prefix_entries(self, layer: int, b: Block):
        """(group, weight (d_out, d_in), bias or None) of one block's packed maps: the attention's and the
        norms' (shared by the families), then the MLP's chunks (:meth:`_mlp_entries`)."""
        yield f"{layer}.ln1", torch.diag(b["ln1.w"]), b.get("ln1.b")
        yield f"{layer}.qk", torch.cat((b["q.w"], b["k.w"])), cat_or_none(b.get("q.b"), b.get("k.b"))
        yield f"{layer}.v", b["v.w"], b.get("v.b")
        yield f"{layer}.o", b["o.w"], b.get("o.b")
        yield f"{layer}.ln2", torch.diag(b["ln2.w"]), b.get("ln2.b")
        yield from self._mlp_entries(layer, b)

    def _mlp_entries(self, layer: int, b: Block):
        """The MLP's packed maps, chunk by chunk (GPT-2 / OPT: fc and proj)."""
        c = self.chunk
        for i in range(self.n_chunks):
            part = slice(i * c, (i + 1) * c)
            yield f"{layer}.fc{i}", b["fc.w"][part], None if "fc.b" not in b else b["fc.b"][part]
            yield f"{layer}.proj{i}", b["proj.w"][:, part], b.get("proj.b") if i == 0 else None

    def _encode_prefix(self) -> torch.Tensor:
        """(P, prefix width): the prefix rows; their coordinates beyond the packed slots are always zero."""
        X = torch.zeros(self.pre.n_rows, self.pre.width, dtype=self.dtype, device=self.device)
        if X.is_meta:
            return X
        s = self.spec
        for layer, b in enumerate(s.blocks):
            for group, weight, bias in self._prefix_entries(layer, b):
                self.pre.encode(X, self.pre.groups[group], weight, bias)
        self.pre.encode(X, self.pre.groups["lnf"], torch.diag(s.ln_f["w"]), s.ln_f.get("b"))
        return X

    def updated_blocks(self, state: State) -> list[Block]:
        """The simulated blocks as read back from the prefix rows of the final state (per-example tensors)."""
        out, prefix = [], state.pre
        for layer in self.tops:
            read = {name.split(".", 1)[1]: self.pre.decode(prefix, g) for name, g in self.pre.groups.items()
                    if name.startswith(f"{layer}.")}
            out.append({k: v for k, v in self._block_from(read).items() if k in self.spec.blocks[layer]})
        return out

    def _block_from(self, read: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Block:
        """AuxSpec-named tensors from the decoded groups of one block (keys the auxiliary lacks are dropped
        by the caller)."""
        Dq = self.dq
        b: Block = {}
        for ln in ("ln1", "ln2"):
            w, bias = read[ln]
            b[f"{ln}.w"], b[f"{ln}.b"] = w.diagonal(dim1=-2, dim2=-1), bias
        (qk, qkb), (v, vb), (o, ob) = read["qk"], read["v"], read["o"]
        b.update({"q.w": qk[:, :Dq], "q.b": qkb[:, :Dq], "k.w": qk[:, Dq:], "k.b": qkb[:, Dq:], "v.w": v,
                  "v.b": vb, "o.w": o, "o.b": ob})
        b.update(self._mlp_from(read))
        return b

    def _mlp_from(self, read: dict) -> Block:
        fcs = [read[f"fc{i}"] for i in range(self.n_chunks)]
        projs = [read[f"proj{i}"] for i in range(self.n_chunks)]
        return {"fc.w": torch.cat([w for w, _ in fcs], -2), "fc.b": torch.cat([x for _, x in fcs], -1),
                "proj.w": torch.cat([w for w, _ in projs], -1), "proj.b": projs[0][1]}

    # ------------------------------------------------------------------ running
    def _encode_rows(self, state: State, rows: RowMap, ids: torch.Tensor, weights: torch.Tensor,
                     positions: torch.Tensor) -> None:
        """Token rows: one, the loss weight c, x = the input embedding; memory rows: one (and the targets)."""
        s, T = self.spec, rows.T
        tok = state.block(rows, "tok")
        tok[..., self.tok["one"][0]], tok[..., self.tok["c"][0]] = 1.0, weights
        x0, D = self.tok["x"][0], s.d_model
        tok[..., x0:x0 + D] = s.wte[ids]
        if s.wpe is not None:
            tok[..., x0:x0 + D] += s.wpe[positions + s.pos_offset]
        state.rest[:, T:, self.mem["one"][0]] = 1.0
        e0 = self.mem["tok"][0]
        state.block(rows, "mem0")[..., e0:e0 + D] = s.lm_head[ids]

    def run(self, ids: torch.Tensor, weights: torch.Tensor, positions: torch.Tensor,
            aux_allowed: torch.Tensor, dense: bool = False):
        """The network's forward pass on token rows ``ids`` (B, T).

        Args:
            weights: (B, T) loss weight of position t (for predicting token t + 1).
            positions: (T,) position of each token. aux_allowed: (T, T) the auxiliary's attention mask.
            dense: run each module's own forward on the whole state (small models only).
        Returns:
            (final :class:`~hdopt.tint.compact.executor.State`, row map, inner losses (list of (B,))).
        """
        B, T = ids.shape
        if int(positions.max()) >= self.config.max_len:
            raise ValueError(f"positions must be < max_len={self.config.max_len}")
        rows = RowMap(self.pre.groups, self.pre.n_rows, T, len(self.tops))
        state = State(self.prefix.expand(B, -1, -1).clone(),
                      torch.zeros(B, rows.N - rows.P, self.width, dtype=self.dtype))
        self._encode_rows(state, rows, ids, weights, positions)
        losses = []
        for entry in self.program:
            if entry == LOSS:
                losses.append(self._loss(state, rows, ids, weights))
                continue
            op, site = entry
            (apply_dense if dense else self._sliced)(self.ops[op], state, site, rows, aux_allowed)
        return state, rows, losses

    def output_logits(self, state: State, rows: RowMap, index: torch.Tensor | slice) -> torch.Tensor:
        """The output head: logits ``u @ E^T`` at token rows ``index``."""
        u0, D = self.tok["u"][0], self.spec.d_model
        return state.block(rows, "tok")[:, index, u0:u0 + D] @ self.spec.lm_head.mT

    def _loss(self, state: State, rows: RowMap, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(self.output_logits(state, rows, slice(0, -1)), -1)
        return -(logp.gather(-1, ids[:, 1:, None]).squeeze(-1) * weights[:, :-1]).sum(1)

    def loss_weights(self, targets: torch.Tensor, context_len: int) -> torch.Tensor:
        """(B, T) weight of position t = whether token t + 1 is a context target (normalized for 'mean')."""
        targets = targets.clone()
        targets[:, 0], targets[:, context_len:] = False, False
        w = targets[:, 1:].to(self.dtype)
        if self.config.reduction == "mean":
            w = w / w.sum(1, keepdim=True).clamp_min(1)
        return torch.cat((w, torch.zeros(w.shape[0], 1, dtype=self.dtype)), 1)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, context_len: int, targets: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, dense: bool = False) -> TinTOutput:
        """Same contract as :meth:`StructuredTinT.forward` (no padding: ``attention_mask`` must be None)."""
        if attention_mask is not None:
            raise ValueError("the compact TinT takes unpadded batches (attention_mask=None)")
        B, T = input_ids.shape
        if not 1 <= context_len <= T:
            raise ValueError(f"context_len must be in [1, {T}], got {context_len}")
        targets = torch.ones_like(input_ids, dtype=torch.bool) if targets is None else targets
        weights = self.loss_weights(targets, context_len)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        state, rows, losses = self.run(input_ids, weights, torch.arange(T), causal, dense)
        logits = self.output_logits(state, rows, slice(context_len - 1, None))
        inner = torch.stack(losses) if losses else torch.zeros(0, B, dtype=self.dtype)
        return TinTOutput(query_logits=logits, inner_losses=inner, blocks=self.updated_blocks(state))

    @torch.no_grad()
    def packed_logits(self, context: list[int], targets: list[int], queries: list[list[int]],
                      dense: bool = False) -> torch.Tensor:
        """Logits at the last token of each query, all queries in one forward pass: ``[context | q_1 | ...]``
        where query i sees the context and itself (positions continue the context's), like separate passes.

        Args:
            context: token ids of the context; targets: positions of its training targets (the loss is on
                these tokens); queries: token ids of each query.
        Returns:
            (len(queries), V) logits.
        """
        Tc, lengths = len(context), [len(q) for q in queries]
        ids = torch.tensor([context + [t for q in queries for t in q]])
        segment = torch.cat([torch.zeros(Tc, dtype=torch.long)]
                            + [torch.full((n,), i + 1) for i, n in enumerate(lengths)])
        positions = torch.cat([torch.arange(Tc)] + [torch.arange(Tc, Tc + n) for n in lengths])
        T = ids.shape[1]
        allowed = torch.ones(T, T, dtype=torch.bool).tril()
        allowed &= (segment[:, None] == segment[None, :]) | (segment[None, :] == 0)
        mask = torch.zeros(1, T, dtype=torch.bool)
        mask[0, targets] = True
        state, rows, _ = self.run(ids, self.loss_weights(mask, Tc), positions, allowed, dense)
        last = Tc + torch.tensor(lengths).cumsum(0) - 1
        return self.output_logits(state, rows, last)[0]

    # ------------------------------------------------------------------ size
    def embedding_params(self) -> int:
        """The TinT's own embeddings: input tokens, positions, and the output head when untied."""
        s = self.spec
        n = s.wte.numel() + (0 if s.wpe is None else s.wpe.numel())
        return n + (0 if _tied(s.lm_head, s.wte) else s.lm_head.numel())

    @property
    def prefix_values(self) -> int:
        """P x W: the prefix rows of the state, the auxiliary's packed weights (the reference counts them)."""
        return self.pre.n_rows * self.width

    def num_parameters(self, reuse: bool | str = True, prefix: bool = False) -> int:
        """Fixed-pattern module weights + embeddings (+ :attr:`prefix_values` when ``prefix``).

        ``reuse``: True (each module once: one per fixed pattern), ``"layer"`` (modules shared across steps
        and passes within a block but not across blocks, the reference's kind of reuse) or False (one module
        per application).
        """
        if reuse == "layer":
            modules = sum(self._scoped.values())
        else:
            modules = sum(p.numel() for p in self.ops.parameters()) if reuse else self._unshared
        return modules + self.embedding_params() + (self.prefix_values if prefix else 0)

    def size_report(self) -> dict:
        kinds = {}
        for g in self.pre.groups.values():
            kinds.setdefault(g.kind, {"d_in": g.d_in, "d_out": g.d_out, "slots": g.slots, "rows": g.rows})
        return {"width": self.width, "token_width": self.tok.width, "prefix_width": self.pre.width,
                "prefix_rows": self.pre.n_rows, "mlp_chunk": self.chunk, "groups": kinds,
                "modules": len(self.ops), "module_applications": len([e for e in self.program if e != LOSS]),
                "module_params": sum(p.numel() for p in self.ops.parameters()),
                "embeddings": self.embedding_params(), "prefix_values": self.prefix_values,
                **{f"params_{name}{suffix}": self.num_parameters(reuse, prefix)
                   for name, reuse in (("reused", True), ("layer_scoped", "layer"), ("no_reuse", False))
                   for suffix, prefix in (("", False), ("_with_prefix", True))},
                "nonzero_pattern_weights": self.patterns.nonzeros}


def mlp_chunk_for(d_model: int, d_ff: int, attention_width: int, registers: int) -> int:
    """The largest divisor c of d_ff whose ``registers`` chunk registers fit beside du (d_model wide) in the
    scratch region R (as wide as the attention's registers, at least 4 d_model)."""
    room = max(attention_width, 4 * d_model) - d_model
    fits = [c for c in range(1, d_ff + 1) if d_ff % c == 0 and registers * c <= room]
    return max(fits) if fits else 1


def _tied(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors are the same weights (``from_hf`` detaches tied weights into distinct objects that
    share storage; meta tensors have none, so they are tied when identical)."""
    if a is b:
        return True
    if a.is_meta or b.is_meta:
        return False
    return (a.untyped_storage().data_ptr(), a.storage_offset(), a.shape) == \
        (b.untyped_storage().data_ptr(), b.storage_offset(), b.shape)


def cat_or_none(*parts: torch.Tensor | None) -> torch.Tensor | None:
    """Concatenate biases, or None when the maps have none."""
    return None if any(p is None for p in parts) else torch.cat(parts)
