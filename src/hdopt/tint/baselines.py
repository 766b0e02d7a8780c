"""Explicit fine-tuning baselines: true SGD with torch autograd on a Hugging Face model's top blocks.

This is what TinT simulates; the experiments compare against it (dynamic evaluation for language modelling,
fine-tuning on the demonstrations for few-shot classification). The model is restored afterwards and the
updated blocks are returned in :class:`hdopt.tint.aux.AuxSpec` naming, ready for ``StructuredTinT.run``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hdopt.tint.aux import Block, from_hf


def hf_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a GPT-2, OPT or Llama-family Hugging Face model."""
    if hasattr(model, "transformer"):
        return model.transformer.h
    if hasattr(model.model, "decoder"):
        return model.model.decoder.layers
    return model.model.layers


def context_loss(logits: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor,
                 reduction: str) -> torch.Tensor:
    """Sum over the batch of each sequence's next-token CE on its ``targets`` (B, T) bool (token t >= 1)."""
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
    w = targets[:, 1:].to(nll.dtype)
    if reduction == "mean":
        w = w / w.sum(1, keepdim=True).clamp_min(1)
    return (nll * w).sum()


def sgd_finetune(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor, n_layers: int, n_steps: int,
                 lr: float, reduction: str = "mean") -> tuple[list[Block], list[float]]:
    """``n_steps`` of ``theta <- theta - lr * grad`` on the top ``n_layers`` blocks (context ``ids`` (1, T)).

    Returns (updated top blocks as AuxSpec dicts, the loss before each step); ``model`` is left unchanged.
    """
    top = hf_blocks(model)[-n_layers:]
    params = [p for block in top for p in block.parameters()]
    saved = [p.detach().clone() for p in params]
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    losses = []
    try:
        for p in params:
            p.requires_grad_(True)
        for _ in range(n_steps):
            loss = context_loss(model(input_ids=ids).logits, ids, targets, reduction)
            grads = torch.autograd.grad(loss, params)
            loss = loss.detach()
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p -= lr * g
            losses.append(loss.item())
        blocks = [{k: v.clone() for k, v in b.items()} for b in from_hf(model).blocks[-n_layers:]]
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    return blocks, losses
