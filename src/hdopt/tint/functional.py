"""The auxiliary transformer's forward pass as pure functions of an :class:`AuxSpec`'s tensors.

Shapes: B batch, T tokens, D model width, H query heads, Hkv key/value heads, dh head width, F MLP width.
Block parameters are either shared, ``w: (out, in)`` and ``b: (out,)``, or per example after a simulated
update, ``w: (B|1, out, in)`` and ``b: (B|1, out)``; all ops accept both (:func:`linear`, :func:`vec`).
``block_forward`` can keep the activations that the manual backward pass (:mod:`hdopt.tint.backward`) needs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hdopt.tint.aux import AuxSpec, Block

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def vec(v: torch.Tensor) -> torch.Tensor:
    """A bias/gain broadcastable against (B, T, n): shared (n,) stays, per-example (B, n) -> (B, 1, n)."""
    return v.unsqueeze(-2) if v.dim() == 2 else v


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, in) -> (B, T, out) with w (out, in) or (B|1, out, in)."""
    y = x @ w.mT
    return y if b is None else y + vec(b)


def activation(name: str, h: torch.Tensor) -> torch.Tensor:
    if name == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if name == "gelu":
        return F.gelu(h)
    if name == "relu":
        return F.relu(h)
    if name == "silu":
        return F.silu(h)
    raise ValueError(f"unknown activation {name!r}")


def activation_derivative(name: str, h: torch.Tensor) -> torch.Tensor:
    """f'(h) elementwise, in closed form."""
    if name == "gelu_tanh":  # f = h/2 (1 + tanh(c (h + 0.044715 h^3)))
        t = torch.tanh(_SQRT_2_OVER_PI * (h + 0.044715 * h**3))
        return 0.5 * (1 + t) + 0.5 * h * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * h * h)
    if name == "gelu":  # f = h Phi(h)
        pdf = torch.exp(-0.5 * h * h) / math.sqrt(2 * math.pi)
        return 0.5 * (1 + torch.erf(h / math.sqrt(2.0))) + h * pdf
    if name == "relu":
        return (h > 0).to(h.dtype)
    if name == "silu":
        s = torch.sigmoid(h)
        return s * (1 + h * (1 - s))
    raise ValueError(f"unknown activation {name!r}")


def normalize(spec: AuxSpec, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The parameter-free part of the norm: LayerNorm ``(x - mean)/std`` or RMSNorm ``x/rms``.

    Returns (xhat (B, T, D), rstd (B, T, 1)).
    """
    if spec.family == "llama":
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + spec.norm_eps)
        return x * rstd, rstd
    xc = x - x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + spec.norm_eps)
    return xc * rstd, rstd


def norm(spec: AuxSpec, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    """Full norm ``w * xhat + b``; returns (out, xhat, rstd)."""
    xhat, rstd = normalize(spec, x)
    out = xhat * vec(w)
    return (out if b is None else out + vec(b)), xhat, rstd


def rope_tables(spec: AuxSpec, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (T, dh) for integer positions (T,), computed in float32 like Hugging Face."""
    freqs = positions.float()[:, None] * spec.inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * spec.rope_scaling).to(dtype), (emb.sin() * spec.rope_scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, dh) by position: x cos + rotate_half(x) sin."""
    return x * cos + rotate_half(x) * sin


def rope_transpose(g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The adjoint of :func:`rope` (a rotation by minus the angle): rotate_half^T = -rotate_half."""
    return g * cos - rotate_half(g * sin)


def embed(spec: AuxSpec, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Token (+ learned position) embeddings, (B, T) -> (B, T, D); positions start at ``start``."""
    x = spec.wte[ids]
    if spec.wpe is not None:
        pos = torch.arange(start, start + ids.shape[1], device=ids.device) + spec.pos_offset
        x = x + spec.wpe[pos]
    return x


def heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, T, n*dh) -> (B, n, T, dh)."""
    B, T, _ = x.shape
    return x.view(B, T, n, -1).transpose(1, 2)


def merge(x: torch.Tensor) -> torch.Tensor:
    """(B, n, T, dh) -> (B, T, n*dh)."""
    B, n, T, dh = x.shape
    return x.transpose(1, 2).reshape(B, T, n * dh)


def attention_mask(Tq: int, Tk: int, key_mask: torch.Tensor | None, device) -> torch.Tensor:
    """Boolean (B|1, 1, Tq, Tk) 'may attend': causal, with the queries being the last Tq of the Tk keys."""
    q = torch.arange(Tk - Tq, Tk, device=device)[:, None]
    allowed = (torch.arange(Tk, device=device)[None, :] <= q)[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :].bool()
    return allowed


def block_forward(spec: AuxSpec, p: Block, x: torch.Tensor, ctx: dict, keep: bool = False):
    """One pre-norm block. ``ctx`` holds ``allowed`` (the attention mask), ``cos``/``sin`` (RoPE tables for
    the current tokens) and optionally ``past`` = (k, v) of earlier tokens (B|1, Hkv, Tp, dh).

    Returns (y (B, T, D), cache dict or None, (k, v) of all keys seen, for a KV cache).
    """
    H, Hkv = spec.n_heads, spec.n_kv_heads
    u1, xhat1, rstd1 = norm(spec, x, p["ln1.w"], p.get("ln1.b"))
    q = heads(linear(u1, p["q.w"], p.get("q.b")), H)  # (B, H, T, dh)
    k = heads(linear(u1, p["k.w"], p.get("k.b")), Hkv)  # (B, Hkv, T, dh)
    v = heads(linear(u1, p["v.w"], p.get("v.b")), Hkv)
    if spec.family == "llama":
        q, k = rope(q, ctx["cos"], ctx["sin"]), rope(k, ctx["cos"], ctx["sin"])
    if ctx.get("past") is not None:  # prepend cached keys/values (shared across the batch if B == 1)
        pk, pv = ctx["past"]
        k = torch.cat((pk.expand(k.shape[0], -1, -1, -1), k), dim=2)
        v = torch.cat((pv.expand(v.shape[0], -1, -1, -1), v), dim=2)
    rep = H // Hkv  # grouped-query attention: query head h reads key/value head h // rep
    kk, vv = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, Tk, dh)
    scores = (q @ kk.mT) * spec.attn_scale  # (B, H, T, Tk)
    probs = torch.softmax(scores.masked_fill(~ctx["allowed"], float("-inf")), dim=-1)
    if ctx.get("detach_probs"):  # for autograd versions of the reference rule (stop-gradient at scores)
        probs = probs.detach()
    o = merge(probs @ vv)  # (B, T, H*dh)
    x2 = x + linear(o, p["o.w"], p.get("o.b"))
    u2, xhat2, rstd2 = norm(spec, x2, p["ln2.w"], p.get("ln2.b"))
    if spec.family == "llama":  # SwiGLU: down(silu(gate u) * up u)
        g, up = linear(u2, p["gate.w"], p.get("gate.b")), linear(u2, p["up.w"], p.get("up.b"))
        s = activation(spec.activation, g)
        a = s * up
        y = x2 + linear(a, p["down.w"], p.get("down.b"))
        mlp = {"g": g, "s": s, "up": up}
    else:
        h = linear(u2, p["fc.w"], p.get("fc.b"))
        a = activation(spec.activation, h)
        y = x2 + linear(a, p["proj.w"], p.get("proj.b"))
        mlp = {"h": h}
    cache = None
    if keep:
        cache = {"x": x, "xhat1": xhat1, "rstd1": rstd1, "u1": u1, "q": q, "kk": kk, "vv": vv,
                 "probs": probs, "o": o, "x2": x2, "xhat2": xhat2, "rstd2": rstd2, "u2": u2, "a": a,
                 **mlp}
    return y, cache, (k, v)


def final_logits(spec: AuxSpec, x: torch.Tensor) -> torch.Tensor:
    """(B, T, D) -> (B, T, V)."""
    u, _, _ = norm(spec, x, spec.ln_f["w"], spec.ln_f.get("b"))
    return u @ spec.lm_head.mT
