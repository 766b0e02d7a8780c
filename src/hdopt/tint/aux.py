"""The auxiliary ("baby") transformer as plain tensors.

:func:`from_hf` reads a Hugging Face causal LM into an :class:`AuxSpec`: the architecture facts TinT needs
(norm kind, activation, positions, heads) and every weight under one naming scheme, with linear weights in
``(out, in)`` orientation. Two families are supported:

* ``"gpt2"`` style (GPT-2, OPT): LayerNorm with bias, biased linears, a 2-matrix MLP (GELU or ReLU) and
  learned absolute positions;
* ``"llama"`` style (Llama, SmolLM2, Mistral-like): RMSNorm, SwiGLU MLP, rotary positions and grouped-query
  attention.

Per-block names: ``ln1.w ln1.b q.w q.b k.w k.b v.w v.b o.w o.b ln2.w ln2.b`` then ``fc.w fc.b proj.w proj.b``
(gpt2 style) or ``gate.w up.w down.w`` (llama style); biases that a model lacks are absent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Block = dict[str, torch.Tensor]

# Hugging Face activation names -> the names used here (see hdopt.tint.functional.activation).
_ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


@dataclass
class AuxSpec:
    """An auxiliary transformer: architecture facts and weights (all tensors, no modules)."""

    family: str  # "gpt2" (LayerNorm, MLP, learned positions) or "llama" (RMSNorm, SwiGLU, RoPE, GQA)
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab_size: int
    activation: str  # gelu_tanh | gelu | relu | silu
    norm_eps: float
    attn_scale: float  # multiplies q.k
    wte: torch.Tensor  # (V, D) input embeddings
    lm_head: torch.Tensor  # (V, D) output embeddings (often the same tensor as wte)
    blocks: list[Block] = field(default_factory=list)
    ln_f: Block = field(default_factory=dict)  # {"w": (D,), "b": (D,)} (no "b" for RMSNorm)
    wpe: torch.Tensor | None = None  # (T_max, D) learned positions (gpt2 style)
    pos_offset: int = 0  # OPT's learned positions start at index 2
    inv_freq: torch.Tensor | None = None  # (head_dim/2,) rotary frequencies (llama style)
    rope_scaling: float = 1.0  # attention_scaling of the rotary embedding

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def num_parameters(self) -> int:
        """Distinct auxiliary parameters (tied embeddings counted once)."""
        seen: dict[object, int] = {}
        tensors = [self.wte, self.lm_head, self.wpe, *self.ln_f.values()]
        tensors += [t for b in self.blocks for t in b.values()]
        for t in tensors:
            if t is not None:  # tied weights share storage (meta tensors have none: tie by identity)
                key = id(t) if t.is_meta else (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape)
                seen[key] = t.numel()
        return sum(seen.values())

    def to(self, dtype: torch.dtype) -> AuxSpec:
        """A copy with every floating tensor cast to ``dtype`` (ties are kept)."""
        memo: dict[int, torch.Tensor] = {}

        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None or not t.is_floating_point() or t is self.inv_freq:
                return t
            if id(t) not in memo:
                memo[id(t)] = t.to(dtype)
            return memo[id(t)]

        out = AuxSpec(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        out.wte, out.lm_head, out.wpe = cast(self.wte), cast(self.lm_head), cast(self.wpe)
        out.ln_f = {k: cast(v) for k, v in self.ln_f.items()}
        out.blocks = [{k: cast(v) for k, v in b.items()} for b in self.blocks]
        return out

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.dtype


def from_hf(model: torch.nn.Module) -> AuxSpec:
    """Read a Hugging Face GPT-2, OPT or Llama-family causal LM into an :class:`AuxSpec` (detached)."""
    kind = getattr(model.config, "model_type", "")
    readers = {"gpt2": _from_gpt2, "opt": _from_opt, "llama": _from_llama, "mistral": _from_llama,
               "qwen2": _from_llama}
    if kind not in readers:
        raise ValueError(f"unsupported auxiliary model_type {kind!r}; supported: {sorted(readers)}")
    with torch.no_grad():
        return readers[kind](model)


def _act(name: str) -> str:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _d(t: torch.Tensor) -> torch.Tensor:
    return t.detach()


def _from_gpt2(model) -> AuxSpec:
    cfg, tr = model.config, model.transformer
    if cfg.scale_attn_by_inverse_layer_idx or cfg.reorder_and_upcast_attn or not cfg.scale_attn_weights:
        raise ValueError("GPT-2 variants with non-standard attention scaling are not supported")
    D, H = cfg.n_embd, cfg.n_head
    blocks = []
    for blk in tr.h:
        # HF GPT-2 uses Conv1D: weight is (in, out); transpose to (out, in).
        w_qkv, b_qkv = _d(blk.attn.c_attn.weight).T, _d(blk.attn.c_attn.bias)
        b: Block = {"ln1.w": _d(blk.ln_1.weight), "ln1.b": _d(blk.ln_1.bias)}
        for i, name in enumerate("qkv"):
            b[f"{name}.w"] = w_qkv[i * D:(i + 1) * D].contiguous()
            b[f"{name}.b"] = b_qkv[i * D:(i + 1) * D].contiguous()
        b.update({"o.w": _d(blk.attn.c_proj.weight).T.contiguous(), "o.b": _d(blk.attn.c_proj.bias),
                  "ln2.w": _d(blk.ln_2.weight), "ln2.b": _d(blk.ln_2.bias),
                  "fc.w": _d(blk.mlp.c_fc.weight).T.contiguous(), "fc.b": _d(blk.mlp.c_fc.bias),
                  "proj.w": _d(blk.mlp.c_proj.weight).T.contiguous(), "proj.b": _d(blk.mlp.c_proj.bias)})
        blocks.append(b)
    return AuxSpec(family="gpt2", d_model=D, n_heads=H, n_kv_heads=H, head_dim=D // H,
                   d_ff=blocks[0]["fc.w"].shape[0], vocab_size=cfg.vocab_size,
                   activation=_act(cfg.activation_function), norm_eps=cfg.layer_norm_epsilon,
                   attn_scale=(D // H) ** -0.5, wte=_d(tr.wte.weight), lm_head=_d(model.lm_head.weight),
                   blocks=blocks, ln_f={"w": _d(tr.ln_f.weight), "b": _d(tr.ln_f.bias)},
                   wpe=_d(tr.wpe.weight))


def _from_opt(model) -> AuxSpec:
    cfg, dec = model.config, model.model.decoder
    if not cfg.do_layer_norm_before or dec.project_in is not None or dec.final_layer_norm is None:
        raise ValueError("only pre-LN OPT models without embedding projections (e.g. opt-125m) are supported")
    D, H = cfg.hidden_size, cfg.num_attention_heads
    blocks = []
    for lyr in dec.layers:
        a = lyr.self_attn
        b: Block = {"ln1.w": _d(lyr.self_attn_layer_norm.weight), "ln1.b": _d(lyr.self_attn_layer_norm.bias)}
        for name, lin in (("q", a.q_proj), ("k", a.k_proj), ("v", a.v_proj), ("o", a.out_proj),
                          ("fc", lyr.fc1), ("proj", lyr.fc2)):
            b[f"{name}.w"] = _d(lin.weight)
            if lin.bias is not None:
                b[f"{name}.b"] = _d(lin.bias)
        b.update({"ln2.w": _d(lyr.final_layer_norm.weight), "ln2.b": _d(lyr.final_layer_norm.bias)})
        blocks.append(b)
    return AuxSpec(family="gpt2", d_model=D, n_heads=H, n_kv_heads=H, head_dim=D // H, d_ff=cfg.ffn_dim,
                   vocab_size=cfg.vocab_size, activation=_act(cfg.activation_function), norm_eps=1e-5,
                   attn_scale=(D // H) ** -0.5, wte=_d(dec.embed_tokens.weight),
                   lm_head=_d(model.lm_head.weight), blocks=blocks,
                   ln_f={"w": _d(dec.final_layer_norm.weight), "b": _d(dec.final_layer_norm.bias)},
                   wpe=_d(dec.embed_positions.weight), pos_offset=dec.embed_positions.offset)


def _from_llama(model) -> AuxSpec:
    cfg, body = model.config, model.model
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    dh = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    blocks = []
    for lyr in body.layers:
        a, m = lyr.self_attn, lyr.mlp
        b: Block = {"ln1.w": _d(lyr.input_layernorm.weight), "ln2.w": _d(lyr.post_attention_layernorm.weight)}
        for name, lin in (("q", a.q_proj), ("k", a.k_proj), ("v", a.v_proj), ("o", a.o_proj),
                          ("gate", m.gate_proj), ("up", m.up_proj), ("down", m.down_proj)):
            b[f"{name}.w"] = _d(lin.weight)
            if lin.bias is not None:
                b[f"{name}.b"] = _d(lin.bias)
        blocks.append(b)
    rot = body.rotary_emb
    if getattr(rot, "rope_type", "default") not in ("default", "linear"):
        raise ValueError(f"rope type {rot.rope_type!r} is not supported (default and linear are)")
    return AuxSpec(family="llama", d_model=cfg.hidden_size, n_heads=H, n_kv_heads=Hkv, head_dim=dh,
                   d_ff=cfg.intermediate_size, vocab_size=cfg.vocab_size, activation=_act(cfg.hidden_act),
                   norm_eps=cfg.rms_norm_eps, attn_scale=dh ** -0.5, wte=_d(body.embed_tokens.weight),
                   lm_head=_d(model.lm_head.weight), blocks=blocks, ln_f={"w": _d(body.norm.weight)},
                   inv_freq=_d(rot.inv_freq).float(), rope_scaling=float(rot.attention_scaling))
