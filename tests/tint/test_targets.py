"""Label-only (``targets``) TinT updates against an oracle that shares no code with hdopt.tint.

Oracle: the Hugging Face model's own forward, the masked next-token cross-entropy written below, torch
autograd and ``torch.optim.SGD`` on every parameter of the top ``n_layers`` blocks (what the exact mode
updates), one fine-tuning run per sequence. Everything in float64: HF's Llama computes RMSNorm (and the eager
softmax) in float32, so the Llama oracle uses ``sdpa`` attention and a float64 RMSNorm forward (same formula).
"""

from __future__ import annotations

import copy

import pytest
import torch
from tint_models import random_ids, rel, tiny_model

from hdopt.tint import TinTConfig, build

N_CTX, LR = 10, 0.05
# Float64 rounding (eps = 1.1e-16) accumulated over the forward, backward and 2 steps: measured <= 8e-16
# relative error of the logit change (and of the losses) for every case below; 1e-12 = 1e4 eps.
TOL = 1e-12


def label_mask(B: int, T: int) -> torch.Tensor:
    """Label-token targets inside the context, a different number per sequence (3 and 2)."""
    targets = torch.zeros(B, T, dtype=torch.bool)
    targets[0, [3, 6, 9]] = True
    targets[1 % B, [5, 8]] = True
    return targets


def oracle_model(arch: str, monkeypatch) -> torch.nn.Module:
    """A tiny float64 GPT-2, or a Llama with 4 query / 2 key-value heads, whose forward stays in float64."""
    model = tiny_model(arch)
    if arch == "llama":
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        def rmsnorm_fp64(self, x):
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

        monkeypatch.setattr(LlamaRMSNorm, "forward", rmsnorm_fp64)
        model.config._attn_implementation = "sdpa"
        assert model.config.num_key_value_heads < model.config.num_attention_heads
    return model


def top_blocks(model, n_layers: int) -> torch.nn.ModuleList:
    body = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    return body[-n_layers:]


def masked_ce(logits: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    """Cross-entropy of predicting token t at t - 1, on the tokens marked in ``targets`` (1, T) only."""
    logp = torch.log_softmax(logits[0, :-1], dim=-1)
    nll = -logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
    mask = targets[0, 1:].to(nll.dtype)
    loss = (nll * mask).sum()
    return loss / mask.sum() if reduction == "mean" else loss


def oracle(model, ids, targets, n_layers: int, steps: int, reduction: str):
    """SGD on the context's label loss, one sequence at a time: (logits from N_CTX - 1 on, losses)."""
    logits, losses = [], []
    for i in range(ids.shape[0]):
        m = copy.deepcopy(model)
        m.requires_grad_(False)
        params = [p for block in top_blocks(m, n_layers) for p in block.parameters()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.SGD(params, lr=LR)
        ctx, tgt = ids[i:i + 1, :N_CTX], targets[i:i + 1, :N_CTX]
        seq_losses = []
        for _ in range(steps):
            opt.zero_grad()
            loss = masked_ce(m(input_ids=ctx).logits, ctx, tgt, reduction)
            loss.backward()
            opt.step()
            seq_losses.append(loss.detach())
        with torch.no_grad():
            logits.append(m(input_ids=ids[i:i + 1]).logits[:, N_CTX - 1:])
        losses.append(torch.stack(seq_losses))
    return torch.cat(logits), torch.stack(losses, 1)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("reduction,steps", [("sum", 1), ("mean", 1), ("sum", 2), ("mean", 2)])
def test_label_only_update_is_sgd_on_the_label_loss(arch, reduction, steps, monkeypatch):
    model = oracle_model(arch, monkeypatch)
    ids = random_ids(2, 14, seed=7)
    targets = label_mask(2, 14)
    n_layers = 2
    cfg = TinTConfig(n_layers=n_layers, n_steps=steps, inner_lr=LR, reduction=reduction, backward="exact")
    out = build(model, cfg)(ids, context_len=N_CTX, targets=targets)
    want, want_losses = oracle(model, ids, targets, n_layers, steps, reduction)
    with torch.no_grad():
        before = model(input_ids=ids).logits[:, N_CTX - 1:]
    assert rel(want, before) > 1e-3  # the label loss moved the logits
    assert rel(out.query_logits - before, want - before) <= TOL
    assert torch.allclose(out.inner_losses, want_losses, rtol=TOL, atol=0)


def test_oracle_tells_label_loss_from_all_token_loss(monkeypatch):
    """The comparison above can fail: SGD on every context token differs from SGD on the labels by far
    more than TOL."""
    model = oracle_model("gpt2", monkeypatch)
    ids = random_ids(2, 14, seed=7)
    every = torch.ones(2, 14, dtype=torch.bool)
    every[:, 0] = False
    labels, _ = oracle(model, ids, label_mask(2, 14), 2, 1, "sum")
    everything, _ = oracle(model, ids, every, 2, 1, "sum")
    with torch.no_grad():
        before = model(input_ids=ids).logits[:, N_CTX - 1:]
    assert rel(everything - before, labels - before) > 1e6 * TOL
