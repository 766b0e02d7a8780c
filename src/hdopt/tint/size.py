"""Size accounting: parameters of every realization, next to the reference's counts (references/tint.md).

Auxiliary shapes are built as meta tensors, so counting the explicit TinTs of a 124M auxiliary allocates
nothing. Three explicit counts are given: the unpacked construction (:mod:`hdopt.tint.explicit`), the compact
one as built (:mod:`hdopt.tint.compact`), and the compact one from the closed form :func:`compact_formula`,
derived by hand from its program (tests/tint check that the two agree).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hdopt.tint.aux import AuxSpec
from hdopt.tint.compact import compact_tint
from hdopt.tint.compact.program import ROWS_PER_PREFIX, mlp_chunk_for
from hdopt.tint.config import TinTConfig
from hdopt.tint.explicit import explicit_tint

# Counted by building the reference code (references/tint.md): (aux, layers, steps) -> (reused, without
# reuse); None where the reference reports no exact count (OPT-125m without reuse: "2.21B").
REFERENCE_COUNTS = {
    ("gpt2-shape", 12, 1): (1_476_796_914, 1_953_271_458),
    ("gpt2-shape", 6, 2): (1_089_707_166, None),
    ("opt-125m-shape", 12, 1): (1_669_324_018, None),
}
REFERENCE_SOURCE = "references/tint.md (counted by building the reference code with random weights)"


@dataclass(frozen=True)
class Shape:
    family: str
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    n_layers: int
    vocab: int
    max_len: int  # the auxiliary's positions (learned table rows or context length)
    activation: str
    pos_offset: int = 0  # OPT's learned positions start at row 2

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


SHAPES = {
    "gpt2-shape": Shape("gpt2", 768, 12, 12, 3072, 12, 50257, 1024, "gelu_tanh"),
    "opt-125m-shape": Shape("gpt2", 768, 12, 12, 3072, 12, 50272, 2048, "relu", pos_offset=2),
    "smollm2-135m": Shape("llama", 576, 9, 3, 1536, 30, 49152, 8192, "silu"),
}
DEFAULT_MAX_LEN = {"opt-125m-shape": 2048}  # the reference's OPT count is for T_aux = 2048 (others: 1024)


def meta_spec(shape: Shape) -> AuxSpec:
    """An :class:`AuxSpec` of the given shape with meta tensors (no memory); biases as GPT-2/OPT and
    SmolLM2 have them (all for the gpt2 family, none for llama)."""
    D, Fd, dh = shape.d_model, shape.d_ff, shape.head_dim
    kv = shape.n_kv_heads * dh

    def t(*size):
        return torch.empty(*size, device="meta")

    def block() -> dict:  # fresh tensors per block (num_parameters counts distinct tensors)
        if shape.family == "gpt2":
            return {"ln1.w": t(D), "ln1.b": t(D), "q.w": t(D, D), "q.b": t(D), "k.w": t(D, D), "k.b": t(D),
                    "v.w": t(D, D), "v.b": t(D), "o.w": t(D, D), "o.b": t(D), "ln2.w": t(D), "ln2.b": t(D),
                    "fc.w": t(Fd, D), "fc.b": t(Fd), "proj.w": t(D, Fd), "proj.b": t(D)}
        return {"ln1.w": t(D), "q.w": t(D, D), "k.w": t(kv, D), "v.w": t(kv, D), "o.w": t(D, D),
                "ln2.w": t(D), "gate.w": t(Fd, D), "up.w": t(Fd, D), "down.w": t(D, Fd)}

    gpt2 = shape.family == "gpt2"
    ln_f = {"w": t(D), "b": t(D)} if gpt2 else {"w": t(D)}
    wpe = t(shape.max_len + shape.pos_offset, D) if gpt2 else None
    wte = t(shape.vocab, D)
    return AuxSpec(family=shape.family, d_model=D, n_heads=shape.n_heads, n_kv_heads=shape.n_kv_heads,
                   head_dim=dh, d_ff=Fd, vocab_size=shape.vocab, activation=shape.activation, norm_eps=1e-5,
                   attn_scale=dh ** -0.5, wte=wte, lm_head=wte,
                   blocks=[block() for _ in range(shape.n_layers)],
                   ln_f=ln_f, wpe=wpe, pos_offset=shape.pos_offset)


def compact_formula(shape: Shape, n_layers: int, n_steps: int, max_len: int,
                    rows_per_prefix: int = ROWS_PER_PREFIX, mlp_chunk: int | None = None) -> dict:
    """Sizes of the compact TinT in closed form (tied embeddings; biases as :func:`meta_spec` gives them).

    Every module reads and writes the W-wide state through dense weights, so a module costs W times the sum
    of its inner widths: an attention module with h heads of widths (dqk, dv) has ``W (2 h dqk + 2 h dv)``
    weights, a norm ``2 W D``, an MLP chunk ``2 W c``, a copy of n coordinates ``W (2 + 2n)``. A linear map
    (d_in -> d_out, S = rows per prefix token, K = ceil(d_out / S) prefix rows) costs ``W (2 S (d_in + 1) +
    2 S K)`` forward, ``W (2 S K + 2 S d_in)`` backward, ``W (2 S K + 2 S (d_in + bias))`` for its update.
    Modules are shared by every layer, step and MLP chunk, so the count does not grow with n_layers.
    """
    llama = shape.family == "llama"
    D, Fd, dh = shape.d_model, shape.d_ff, shape.head_dim
    Dq, Dkv = shape.n_heads * dh, shape.n_kv_heads * dh
    regs = 8 if llama else 4  # chunk-wide registers of the MLP backward
    attn = (3 if llama else 2) * (Dq + Dkv)  # q, k, v, o (and the rotated q|k for Llama)
    c = mlp_chunk or mlp_chunk_for(D, Fd, attn, regs)
    R = max(attn, D + regs * c, 4 * D)  # the scratch region
    token_width = 2 + 2 * D + (2 * dh if llama else 0) + (Dq if Dq > D else 0) + D + R
    # (d_in, d_out) of each kind of map; "up" = fc (GPT-2) or gate|up (Llama), "down" = proj / down
    maps = {"ln": (D, D), "qk": (D, Dq + Dkv), "v": (D, Dkv), "o": (Dq, D),
            "up": (D, (2 if llama else 1) * c), "down": (c, D)}
    budget = rows_per_prefix * (D + 1)
    S = {k: max(1, budget // (d_in + 1)) for k, (d_in, _) in maps.items()}
    K = {k: math.ceil(d_out / S[k]) for k, (_, d_out) in maps.items()}
    chunks = Fd // c
    prefix_rows = shape.n_layers * (2 * K["ln"] + K["qk"] + K["v"] + K["o"] + chunks * (K["up"] + K["down"]))
    prefix_rows += K["ln"]  # ln_f
    prefix_width = max(K.values()) + max(S[k] * (d_in + 1) for k, (d_in, _) in maps.items())
    W = max(token_width, prefix_width, 1 + 2 * D)

    def fwd(k: str) -> int:
        return 2 * S[k] * (maps[k][0] + 1) + 2 * S[k] * K[k]

    def bwd(k: str) -> int:
        return 2 * S[k] * K[k] + 2 * S[k] * maps[k][0]

    def upd(k: str, weight: int, bias: int) -> int:
        return 2 * S[k] * K[k] + 2 * S[k] * (weight * maps[k][0] + bias)

    def copy(n: int) -> int:
        return 2 + 2 * n

    bias = 0 if llama else 1
    # forward: 6 linear maps, the attention, a norm, the activation, clears of n, (u, R) and R beyond du
    dims = sum(fwd(k) for k in maps) + 4 * Dq + 2 * D + 2 * c + copy(D) + copy(D + R) + copy(R - D)
    if llama:
        dims += 6 * (Dq + Dkv) + 4 * c  # RoPE (2-coordinate product heads), silu(g) * up
    if n_steps:
        dims += sum(bwd(k) for k in ("ln", "v", "o", "up", "down"))
        dims += upd("o", 1, bias) + upd("v", 1, bias) + upd("up", 1, bias) + upd("down", 1, 0)
        dims += bias * (upd("ln", 0, 1) + upd("down", 0, 1))  # LayerNorm biases; proj bias (chunk 0)
        dims += 4 * Dq + 4 * D + 2 * c + 2 * D  # transposed attention, 2 FD norms, FD activation, vocab
        dims += 2 * copy(D)  # the loss weight heads (expected and target embedding)
        dims += copy(2 * D + R) + copy(D) + copy(Dq + Dkv) + copy(D + Dkv)  # clears: x|u|R, x, v|o, u|dv
        dims += copy(2 * Dq + Dkv + (Dq + Dkv if llama else 0))  # clear q|k(|r)|do
        dims += copy(D) + copy(D) + copy(D)  # clear g, store to and restore from the memory rows
        dims += copy(2 * D) + copy(c) + copy(c)  # finite differences: move x N, subtract f(h), scale N
        if llama:
            dims += 8 * c  # backward products da * s, da * up
        if n_steps >= 2 and n_layers >= 2:
            dims += copy(D)  # forget the stored input of the upper layers
    embeddings = shape.vocab * D
    embeddings += 2 * max_len * dh if llama else (shape.max_len + shape.pos_offset) * D
    modules = W * dims
    return {"width": W, "prefix_rows": prefix_rows, "mlp_chunk": c, "module_params": modules,
            "embeddings": embeddings, "prefix_values": prefix_rows * W, "params_reused": modules + embeddings,
            "params_reused_with_prefix": modules + embeddings + prefix_rows * W}


def size_table(aux: str, n_layers: int, n_steps: int, max_len: int | None = None) -> dict:
    """Parameter counts for ``hdopt tint size``."""
    if aux not in SHAPES:
        raise ValueError(f"unknown auxiliary shape {aux!r}; choose from {sorted(SHAPES)}")
    shape = SHAPES[aux]
    if not 1 <= n_layers <= shape.n_layers or n_steps < 0:
        raise ValueError(f"need 1 <= layers <= {shape.n_layers} and steps >= 0")
    T = max_len or DEFAULT_MAX_LEN.get(aux, min(shape.max_len, 1024))
    spec = meta_spec(shape)
    cfg = TinTConfig(n_layers=n_layers, n_steps=n_steps, backward="reference", max_len=T)
    updated = sum(t.numel() for b in spec.blocks[-n_layers:] for t in b.values())
    out = {"aux": aux, "layers": n_layers, "steps": n_steps, "max_len": T,
           "aux_params": spec.num_parameters(), "structured_stored": spec.num_parameters(),
           "structured_per_example": updated, "reference": REFERENCE_COUNTS.get((aux, n_layers, n_steps)),
           "reference_source": REFERENCE_SOURCE}
    out["explicit"] = explicit_tint(spec, cfg, device="meta").size_report()
    out["explicit_kind"] = "built (meta device)"
    out["compact"] = compact_tint(spec, cfg, device="meta").size_report()
    out["compact_formula"] = compact_formula(shape, n_layers, n_steps, T)
    return out


def format_size(table: dict) -> str:
    e, c, f, ref = table["explicit"], table["compact"], table["compact_formula"], table["reference"]
    rows = [("auxiliary parameters", table["aux_params"]),
            ("structured: stored parameters (= the auxiliary's)", table["structured_stored"]),
            ("structured: extra per sequence (updated copies of the top blocks)",
             table["structured_per_example"]),
            ("compact explicit: modules + embeddings, shared modules once", c["params_reused"]),
            ("compact explicit: + prefix values (P x W, counted as the reference does)",
             c["params_reused_with_prefix"]),
            ("compact explicit: same, by the closed form (compact_formula)", f["params_reused_with_prefix"]),
            ("compact explicit: modules shared within a block only, + prefix",
             c["params_layer_scoped_with_prefix"]),
            ("compact explicit: one module per application, + prefix", c["params_no_reuse_with_prefix"]),
            ("compact explicit: state width W / prefix rows / MLP chunk",
             f"{c['width']:,} / {c['prefix_rows']:,} / {c['mlp_chunk']:,}"),
            (f"unpacked explicit, blocks reused [{table['explicit_kind']}]", e["params_reused"]),
            ("unpacked explicit, without reuse", e["params_no_reuse"]),
            ("unpacked explicit: state width W / prefix rows", f"{e['width']:,} / {e['prefix_rows']:,}"),
            ("reference TinT (tint.md), blocks reused", ref[0] if ref else "not reported"),
            ("reference TinT (tint.md), without reuse", ref[1] if ref and ref[1] else "not reported")]
    head = (f"TinT sizes: aux={table['aux']} layers={table['layers']} steps={table['steps']} "
            f"max_len={table['max_len']}")
    return "\n".join([head] + [f"  {k:<78} {v:>18,}" if isinstance(v, int) else f"  {k:<78} {v:>18}"
                               for k, v in rows])
