"""Size accounting: parameters of both realizations, next to the reference's counts (references/tint.md).

Auxiliary shapes are built as meta tensors: counting the explicit TinT of a 124M auxiliary (GPT-2 or
Llama family) allocates nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hdopt.tint.aux import AuxSpec
from hdopt.tint.config import TinTConfig
from hdopt.tint.explicit import explicit_tint

# Counted by building the reference code (references/tint.md): (aux, layers, steps) -> (reused, without reuse)
REFERENCE_COUNTS = {
    ("gpt2-shape", 12, 1): (1_476_796_914, 1_953_271_458),
    ("gpt2-shape", 6, 2): (1_089_707_166, None),
}


@dataclass(frozen=True)
class Shape:
    family: str
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    n_layers: int
    vocab: int
    max_len: int
    activation: str


SHAPES = {
    "gpt2-shape": Shape("gpt2", 768, 12, 12, 3072, 12, 50257, 1024, "gelu_tanh"),
    "smollm2-135m": Shape("llama", 576, 9, 3, 1536, 30, 49152, 8192, "silu"),
}


def meta_spec(shape: Shape) -> AuxSpec:
    """An :class:`AuxSpec` of the given shape with meta tensors (no memory)."""
    D, Fd, dh = shape.d_model, shape.d_ff, shape.d_model // shape.n_heads
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
    wpe = t(shape.max_len, D) if gpt2 else None
    wte = t(shape.vocab, D)
    return AuxSpec(family=shape.family, d_model=D, n_heads=shape.n_heads, n_kv_heads=shape.n_kv_heads,
                   head_dim=dh, d_ff=Fd, vocab_size=shape.vocab, activation=shape.activation, norm_eps=1e-5,
                   attn_scale=dh ** -0.5, wte=wte, lm_head=wte,
                   blocks=[block() for _ in range(shape.n_layers)],
                   ln_f=ln_f, wpe=wpe)


def size_table(aux: str, n_layers: int, n_steps: int, max_len: int | None = None) -> dict:
    """Parameter counts for ``hdopt tint size``."""
    if aux not in SHAPES:
        raise ValueError(f"unknown auxiliary shape {aux!r}; choose from {sorted(SHAPES)}")
    shape = SHAPES[aux]
    T = max_len or min(shape.max_len, 1024)
    spec = meta_spec(shape)
    cfg = TinTConfig(n_layers=n_layers, n_steps=n_steps, backward="reference", max_len=T)
    updated = sum(t.numel() for b in spec.blocks[-n_layers:] for t in b.values())
    out = {"aux": aux, "layers": n_layers, "steps": n_steps, "max_len": T,
           "aux_params": spec.num_parameters(), "structured_stored": spec.num_parameters(),
           "structured_per_example": updated, "reference": REFERENCE_COUNTS.get((aux, n_layers, n_steps))}
    out["explicit"] = explicit_tint(spec, cfg, device="meta").size_report()
    out["explicit_kind"] = "built (meta device)"
    return out


def format_size(table: dict) -> str:
    e, ref = table["explicit"], table["reference"]
    rows = [("auxiliary parameters", table["aux_params"]),
            ("structured: stored parameters (= the auxiliary's)", table["structured_stored"]),
            ("structured: extra per sequence (updated copies of the top blocks)",
             table["structured_per_example"]),
            (f"explicit, blocks reused [{table['explicit_kind']}]", e["params_reused"]),
            ("explicit, without reuse", e["params_no_reuse"]),
            ("explicit: non-zero pattern weights (what structured replaces by index ops)",
             e["nonzero_pattern_weights"]),
            ("explicit: state width W / prefix rows", f"{e['width']:,} / {e['prefix_rows']:,}"),
            ("reference TinT (tint.md), blocks reused", ref[0] if ref else "not reported"),
            ("reference TinT (tint.md), without reuse", ref[1] if ref and ref[1] else "not reported")]
    head = (f"TinT sizes: aux={table['aux']} layers={table['layers']} steps={table['steps']} "
            f"max_len={table['max_len']}")
    return "\n".join([head] + [f"  {k:<78} {v:>18,}" if isinstance(v, int) else f"  {k:<78} {v:>18}"
                               for k, v in rows])
