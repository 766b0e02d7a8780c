"""The simulated backward pass: loss gradient at the top, then block by block, by hand.

Two rules (:class:`hdopt.tint.config.TinTConfig` ``backward``):

* ``exact``: analytic LayerNorm/RMSNorm and activation Jacobians; gradient through the attention scores
  (``attn_score_grad``); every parameter of the block gets its gradient (norm gains too when
  ``update_norm_gain``). This is true backpropagation.
* ``reference``: the rule of Panigrahi et al. (TinT, ICML 2024): attention probabilities are treated as
  constants (only W_V/b_V, W_O/b_O and the MLP learn from attention), norm and activation backward by a
  finite difference ``J^T g ~ N [f(x + g/N) - f(x)]`` (valid because both Jacobians are symmetric), and
  norm gains frozen.

Gradients are per example: a batch of B sequences simulates B independent fine-tuning runs, so weight
gradients have shape (B, out, in).
"""

from __future__ import annotations

import torch

from hdopt.tint.aux import AuxSpec, Block
from hdopt.tint.config import TinTConfig
from hdopt.tint.functional import (
    activation,
    activation_derivative,
    heads,
    merge,
    normalize,
    rope_transpose,
    vec,
)


def lm_loss_grad(spec: AuxSpec, x: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor,
                 reduction: str, cfg: TinTConfig):
    """Next-token cross-entropy on the marked targets and its gradient w.r.t. the last block's output.

    Args:
        x: (B, T, D) output of the last block. ids: (B, T) tokens.
        targets: (B, T) bool, True where token t (t >= 1) is a training target predicted at t - 1.
        reduction: "sum" or "mean" (over each sequence's own targets).
    Returns:
        (loss (B,), dx (B, T, D)).
    """
    w, b = spec.ln_f["w"], spec.ln_f.get("b")
    xhat, rstd = normalize(spec, x)
    u = xhat * w + (0 if b is None else b)
    logits = u[:, :-1] @ spec.lm_head.mT  # (B, T-1, V): position t predicts token t+1
    weight = targets[:, 1:].to(x.dtype)  # (B, T-1)
    if reduction == "mean":
        weight = weight / weight.sum(1, keepdim=True).clamp_min(1)
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    loss = (nll * weight).sum(1)
    # d loss / d logits = weight * (softmax - onehot)
    dlogits = logp.exp_()
    dlogits.scatter_add_(-1, ids[:, 1:, None], -torch.ones_like(nll)[..., None])
    dlogits *= weight[..., None]
    du = torch.zeros_like(x)
    du[:, :-1] = dlogits @ spec.lm_head  # (B, T-1, D)
    dx = norm_backward(spec, cfg, x, xhat, rstd, w, du)
    return loss, dx


def norm_backward(spec: AuxSpec, cfg: TinTConfig, x, xhat, rstd, w, du) -> torch.Tensor:
    """d loss / d x for u = w * normalize(x) + b, given du = d loss / d u (all (B, T, D))."""
    g = du * vec(w)  # gradient w.r.t. normalize(x)
    if cfg.backward == "reference":
        return finite_difference(lambda z: normalize(spec, z)[0], x, g, xhat, cfg)
    proj = (g * xhat).mean(-1, keepdim=True)
    if spec.family == "llama":  # RMSNorm: J = rstd (I - xhat xhat^T / D)
        return rstd * (g - xhat * proj)
    return rstd * (g - g.mean(-1, keepdim=True) - xhat * proj)  # LayerNorm


def act_backward(spec: AuxSpec, cfg: TinTConfig, h: torch.Tensor, fh: torch.Tensor, da: torch.Tensor):
    """d loss / d h for a = f(h) elementwise, given da; ``fh`` = f(h)."""
    if cfg.backward == "reference":
        return finite_difference(lambda z: activation(spec.activation, z), h, da, fh, cfg)
    return activation_derivative(spec.activation, h) * da


def finite_difference(f, x: torch.Tensor, g: torch.Tensor, fx: torch.Tensor, cfg: TinTConfig) -> torch.Tensor:
    """The reference rule's ``J^T g ~ N [f(x + g/N) - f(x)]`` (J symmetric), ``fx`` = f(x), N = ``fd_scale``.

    The two values of f differ by about |g| / N, so in float32 their difference keeps few correct digits
    (relative error ~ eps |f| N / |g|: 100% of the simulated update for SmolLM2 with a mean label loss,
    docs/tint.md). With ``cfg.fd_float64`` (the default) it is evaluated in float64 and cast back.
    """
    n = cfg.fd_scale
    if not cfg.fd_float64 or x.dtype == torch.float64:
        return n * (f(x + g / n) - fx)
    x64 = x.double()
    return (n * (f(x64 + g.double() / n) - f(x64))).to(x.dtype)


def _lin_grad(grads: Block, name: str, p: Block, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Record dW = sum_t dy_t x_t^T (B, out, in) and db, return dx = dy W."""
    grads[f"{name}.w"] = dy.mT @ x
    if f"{name}.b" in p:
        grads[f"{name}.b"] = dy.sum(1)
    return dy @ p[f"{name}.w"]


def block_backward(spec: AuxSpec, cfg: TinTConfig, p: Block, c: dict, dy: torch.Tensor, ctx: dict):
    """Backward through one block given its forward cache ``c`` and dy = d loss / d output (B, T, D).

    Returns (dx (B, T, D), grads: name -> per-example gradient) for the parameters the rule updates.
    """
    grads: Block = {}
    # ---- MLP: y = x2 + down(a)
    if spec.family == "llama":  # a = silu(g) * up
        da = _lin_grad(grads, "down", p, dy, c["a"])
        dup, ds = da * c["s"], da * c["up"]
        dg = act_backward(spec, cfg, c["g"], c["s"], ds)
        du2 = _lin_grad(grads, "gate", p, dg, c["u2"]) + _lin_grad(grads, "up", p, dup, c["u2"])
    else:  # a = f(h)
        da = _lin_grad(grads, "proj", p, dy, c["a"])
        dh = act_backward(spec, cfg, c["h"], c["a"], da)
        du2 = _lin_grad(grads, "fc", p, dh, c["u2"])
    _norm_grads(grads, "ln2", p, c["xhat2"], du2, cfg)
    dx2 = dy + norm_backward(spec, cfg, c["x2"], c["xhat2"], c["rstd2"], p["ln2.w"], du2)
    # ---- attention: x2 = x + o_proj(merge(P V))
    do = heads(_lin_grad(grads, "o", p, dx2, c["o"]), spec.n_heads)  # (B, H, T, dh)
    probs = c["probs"]  # (B, H, T, Tk)
    dvv = probs.mT @ do  # (B, H, Tk, dh): dv_s = sum_t P_ts do_t
    rep = spec.n_heads // spec.n_kv_heads
    dv = _group_sum(dvv, rep)  # (B, Hkv, T, dh)
    du1 = _lin_grad(grads, "v", p, merge(dv), c["u1"])
    if cfg.attn_score_grad:
        dp = do @ c["vv"].mT  # (B, H, T, Tk)
        ds = probs * (dp - (dp * probs).sum(-1, keepdim=True)) * spec.attn_scale  # softmax Jacobian
        dq, dk = ds @ c["kk"], _group_sum(ds.mT @ c["q"], rep)
        if spec.family == "llama":
            dq, dk = rope_transpose(dq, ctx["cos"], ctx["sin"]), rope_transpose(dk, ctx["cos"], ctx["sin"])
        du1 = du1 + _lin_grad(grads, "q", p, merge(dq), c["u1"])
        du1 = du1 + _lin_grad(grads, "k", p, merge(dk), c["u1"])
    _norm_grads(grads, "ln1", p, c["xhat1"], du1, cfg)
    dx = dx2 + norm_backward(spec, cfg, c["x"], c["xhat1"], c["rstd1"], p["ln1.w"], du1)
    return dx, grads


def _group_sum(t: torch.Tensor, rep: int) -> torch.Tensor:
    """(B, H, T, dh) -> (B, H/rep, T, dh): sum the gradients of query heads sharing a key/value head."""
    if rep == 1:
        return t
    B, H, T, dh = t.shape
    return t.view(B, H // rep, rep, T, dh).sum(2)


def _norm_grads(grads: Block, name: str, p: Block, xhat, du, cfg: TinTConfig) -> None:
    if f"{name}.b" in p:
        grads[f"{name}.b"] = du.sum(1)
    if cfg.update_norm_gain:
        grads[f"{name}.w"] = (du * xhat).sum(1)
